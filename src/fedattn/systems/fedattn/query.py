"""One question, end to end: texts in, the answer and a full traffic/cost report out.

This is the library entry point the CLI and the evaluation harness share.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from transformers import PreTrainedTokenizerBase

from fedattn.runtime.decoding import StopRule
from fedattn.runtime.dims import ModelDims
from fedattn.runtime.prompting import build_segments, check_context_window
from fedattn.systems.fedattn.config import RunConfig
from fedattn.systems.fedattn.costs import PartyCost, run_costs
from fedattn.systems.fedattn.inprocess import RunResult, run_in_process


@dataclass
class QueryReport:
    answer: str
    result: RunResult
    segments: list[list[int]]
    expected: list[PartyCost]
    dims: ModelDims
    config: RunConfig
    answer_texts: dict[int, str]
    wall_s: float

    def to_json(self) -> dict:
        """The --json document (see the README for the fields)."""
        result, schedule = self.result, self.config.schedule
        parties = []
        for report, cost in zip(result.parties, self.expected):
            entry = asdict(report)
            entry.update(
                expected_bytes_sent=cost.wire_bytes_sent,
                expected_bytes_received=cost.wire_bytes_received,
                expected_kv_bytes_sent=cost.kv_bytes_sent,
                expected_kv_bytes_received=cost.kv_bytes_received,
                prefill_flops=cost.prefill_flops,
            )
            if report.rank in self.answer_texts:
                entry["answer"] = self.answer_texts[report.rank]
            parties.append(entry)
        publisher_cost = self.expected[-1]
        return {
            "answer": self.answer,
            "answer_token_ids": result.answer_token_ids,
            "sync_layers": list(schedule.sync_layers),
            "schedule": schedule.describe(),
            "publisher_layers": list(schedule.publisher_layers),
            "publisher_sync_layers": list(schedule.publisher_sync_layers),
            "kv_codec": self.config.codec.name,
            "kv_exchange": asdict(self.config.exchange),
            "participants": parties,
            "expected_bytes": {
                "sent": sum(cost.wire_bytes_sent for cost in self.expected),
                "kv_payload_sent": sum(cost.kv_bytes_sent for cost in self.expected),
                "received": sum(cost.wire_bytes_received for cost in self.expected),
            },
            "measured_bytes": {
                "sent": sum(report.bytes_sent for report in result.parties),
                "received": sum(report.bytes_received for report in result.parties),
            },
            "flops": {
                "prefill": sum(cost.prefill_flops for cost in self.expected),
                "publisher_decode": publisher_cost.decode_flops(self.dims, max(len(result.answer_token_ids) - 1, 0)),
            },
            "timing": {
                "prefill_s": result.prefill_s,
                "decode_s": result.decode_s,
                "decode_tokens_per_s": result.decode_tokens_per_s,
                "wall_s": self.wall_s,
            },
        }


def stop_rule(tokenizer: PreTrainedTokenizerBase, model, texts: tuple[str, ...] = ()) -> StopRule:
    """Stop at the tokenizer's EOS, any EOS the generation config names, or one of ``texts``."""
    ids = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    for value in (tokenizer.eos_token_id, configured):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return StopRule(frozenset(ids), texts, tokenizer.decode if texts else None)


def answer_question(
    model,
    tokenizer: PreTrainedTokenizerBase,
    contexts: list[str],
    question: str,
    config: RunConfig,
    publisher_context: str | None = None,
    raw: bool = False,
) -> QueryReport:
    start = time.perf_counter()
    segments = build_segments(tokenizer, contexts, question, publisher_context, raw)
    check_context_window(segments, config.max_new_tokens, model.config.max_position_embeddings)
    result = run_in_process(model, segments, config, stop_rule(tokenizer, model))
    dims = ModelDims.from_config(model.config)
    expected = run_costs(dims, config, [len(s) for s in segments])
    texts = {rank: tokenizer.decode(ids, skip_special_tokens=True).strip() for rank, ids in result.answers.items()}
    return QueryReport(
        answer=texts[len(segments) - 1],
        result=result,
        segments=segments,
        expected=expected,
        dims=dims,
        config=config,
        answer_texts=texts,
        wall_s=time.perf_counter() - start,
    )
