"""A FedSEA query from text: the loaded model, the client's prompt ids, a run with every party here.

The one model is loaded once and both roles read it (in a deployment each side holds only its own
blocks' weights; ``runtime.blocks.client_share`` says how much of the model that is).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedattn.errors import FedAttnError
from fedattn.report.schema import RunReport
from fedattn.runtime.blocks import SplitModel, client_share
from fedattn.runtime.decoding import answer_text, stop_rule
from fedattn.runtime.models import LoadedModel, load_model
from fedattn.runtime.prompting import Piece, build_segments, check_prompt_length, tokenize_party
from fedattn.systems.fedsea import reporting
from fedattn.systems.fedsea.config import MAX_CLIENT_BLOCKS, SplitConfig
from fedattn.systems.fedsea.inprocess import ClientQuery, run_in_process

IN_PROCESS = "in-process"


@dataclass
class SplitSetup:
    """A configuration with its model loaded and ready to be run piecewise."""

    config: SplitConfig
    loaded: LoadedModel
    device: str
    dtype: str
    raw: bool = False

    def __post_init__(self) -> None:
        self.split = SplitModel(self.loaded.model)
        self.config.check(self.split.num_blocks, limit=self.split.num_blocks)

    def model_json(self) -> dict:
        return {"name": self.loaded.name, "identity": self.loaded.identity}

    def share(self) -> dict[str, float]:
        return client_share(self.loaded.model, *self.config.client_blocks)


def load_setup(
    config: SplitConfig, model: str, device: str, dtype: str, raw: bool, progress: bool = True
) -> SplitSetup:
    loaded = load_model(model, device=device, dtype=getattr(torch, dtype), progress=progress)
    return SplitSetup(config, loaded, device, dtype, raw)


def answer_chat(setup: SplitSetup, text: str) -> RunReport:
    """The answer to a chat prompt (as is with ``raw``), every party in this process."""
    return answer(setup, chat_prompt(setup, text), ())


def answer(setup: SplitSetup, prompt: list[int], stop_texts: tuple[str, ...]) -> RunReport:
    """One in-process run of one client and the server, measured and reported."""
    (report,) = answer_many(setup, [(prompt, stop_texts)])
    return report


def answer_many(setup: SplitSetup, prompts: list[tuple[list[int], tuple[str, ...]]]) -> list[RunReport]:
    """Each (prompt, stop texts) as one client of one server, every party in this process: the
    server runs the clients' pending steps together, as a service would. One report per client,
    in order: its own traffic and the server's side of its session (measured per peer), the cost
    model's bytes for that session, and its equal share of the run's wall time and server compute."""
    loaded = setup.loaded
    rules = {texts: stop_rule(loaded.tokenizer, loaded.model, texts) for _, texts in prompts}
    stops = [rules[texts] for _, texts in prompts]
    queries = [ClientQuery(prompt, setup.config, stop) for (prompt, _), stop in zip(prompts, stops)]
    result = run_in_process(setup.split, loaded.identity, queries, MAX_CLIENT_BLOCKS)
    share = 1 / len(queries)
    handshake_s = result.seconds.get("handshake", 0.0) * share
    reports = []
    for client, stop in zip(result.clients, stops):
        text = answer_text(stop, loaded.tokenizer, client.answer)
        own = reporting.client_party(client)
        own.answer = text  # the client is the party that answers (the harness counts its tokens)
        parties = [reporting.session_party(result.server, client, share), own]
        timing = reporting.client_timing(client, result.wall_s * share, {"handshake": handshake_s})
        reports.append(
            reporting.run_report(
                parties, setup.config, client, setup.model_json(), text, IN_PROCESS, timing, setup.share()
            )
        )
    return reports


def chat_prompt(setup: SplitSetup, text: str) -> list[int]:
    """The client's prompt: the model's chat template around ``text`` (as is with ``raw``)."""
    check_prompt_text(text)
    return checked(setup, build_segments(setup.loaded.tokenizer, [], text, None, setup.raw)[0])


def check_prompt_text(text: str) -> None:
    """Refuse an empty prompt (before any model is loaded, where a command can)."""
    if not text.strip():
        raise FedAttnError("the prompt is empty")


def plain_prompt(setup: SplitSetup, text: str) -> list[int]:
    """A few-shot prompt for a base model: the text as is, no template."""
    return checked(setup, tokenize_party(setup.loaded.tokenizer, [Piece(text, False)], "the prompt"))


def checked(setup: SplitSetup, prompt: list[int]) -> list[int]:
    check_prompt_length(len(prompt), setup.config.max_new_tokens, setup.split.max_positions)
    return prompt
