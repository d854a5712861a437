"""One question, end to end: texts in, the run's report (answer, traffic, costs) out.

This is the library entry point the CLI shares with anyone embedding FedAttn.
"""

from __future__ import annotations

import time

from transformers import PreTrainedTokenizerBase

from fedattn.report.schema import RunReport
from fedattn.runtime.decoding import stop_rule
from fedattn.runtime.dims import ModelDims
from fedattn.runtime.prompting import build_segments, check_context_window
from fedattn.systems.fedattn.config import RunConfig
from fedattn.systems.fedattn.costs import run_costs
from fedattn.systems.fedattn.inprocess import run_in_process
from fedattn.systems.fedattn.reporting import run_report


def answer_question(
    model,
    tokenizer: PreTrainedTokenizerBase,
    contexts: list[str],
    question: str,
    config: RunConfig,
    publisher_context: str | None = None,
    raw: bool = False,
    model_info: dict[str, str] | None = None,
) -> RunReport:
    """The publisher's answer to ``question`` over the collaborators' ``contexts``, all parties in
    this process; ``model_info`` (name, identity) is what the report says about the model."""
    start = time.perf_counter()
    segments = build_segments(tokenizer, contexts, question, publisher_context, raw)
    check_context_window(segments, config.max_new_tokens, model.config.max_position_embeddings)
    result = run_in_process(model, segments, config, stop_rule(tokenizer, model))
    dims = ModelDims.from_config(model.config)
    expected = run_costs(dims, config, [len(s) for s in segments])
    texts = {rank: tokenizer.decode(ids, skip_special_tokens=True).strip() for rank, ids in result.answers.items()}
    return run_report(result, expected, dims, config, model_info or {}, texts, time.perf_counter() - start)
