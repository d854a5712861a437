"""A SpecFed query from text: the loaded models of a configuration, the server's prompt ids, a run.

The server tokenizes the prompt with its own tokenizer (the draft's, or the first worker's under
prompt lookup); the handshake then refuses any worker whose tokenizer differs, so the ids mean the
same text to everyone.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedattn.errors import FedAttnError
from fedattn.report.schema import RunReport
from fedattn.runtime.decoding import answer_text, stop_rule
from fedattn.runtime.models import LoadedModel
from fedattn.runtime.prompting import (
    Piece,
    build_segments,
    check_prompt_length,
    real_vocabulary,
    tokenize_party,
    tokenizer_fingerprint,
)
from fedattn.systems.specfed import protocol, reporting
from fedattn.systems.specfed.config import LOOKUP_DRAFT, SpecFedConfig, load_models, model_names
from fedattn.systems.specfed.drafts import Drafter, LookupDraft, ModelDraft
from fedattn.systems.specfed.inprocess import WorkerModel, run_in_process

IN_PROCESS = "in-process"


@dataclass
class SpecFedSetup:
    """A configuration with its models loaded (each distinct model once)."""

    config: SpecFedConfig
    models: dict[str, LoadedModel]
    device: str
    dtype: str
    raw: bool = False

    @property
    def server_model(self) -> LoadedModel:
        """Whose tokenizer the server uses: the draft's, or the first worker's under prompt lookup."""
        return self.models[server_model_name(self.config)]

    def worker_models(self) -> list[WorkerModel]:
        return [held(self.models[worker.model]) for worker in self.config.workers]

    def drafter(self) -> Drafter:
        return new_drafter(self.config, self.server_model)

    def model_json(self) -> dict:
        """The models as a report names them: each worker's (with its weight) and the draft's."""
        workers = [
            {"name": worker.model, "identity": self._identity(worker.model), "weight": worker.weight}
            for worker in self.config.workers
        ]
        draft = {"name": self.config.draft, "identity": self._identity(self.config.draft)}
        return {"name": "+".join(worker["name"] for worker in workers), "workers": workers, "draft": draft}

    def _identity(self, name: str) -> str | None:
        """A loaded model's identity (a networked party loads only its own model; prompt lookup has none)."""
        loaded = self.models.get(name)
        return None if loaded is None else loaded.identity


def new_drafter(config: SpecFedConfig, server: LoadedModel) -> Drafter:
    """A fresh drafter (its cache is one query's): the server's model, or prompt lookup over its vocabulary."""
    vocab = real_vocabulary(server.tokenizer)
    if config.draft == LOOKUP_DRAFT:
        return LookupDraft(vocab)
    return ModelDraft(server.model, vocab, config.temperature)


def server_model_name(config: SpecFedConfig) -> str:
    return config.workers[0].model if config.draft == LOOKUP_DRAFT else config.draft


def held(loaded: LoadedModel) -> WorkerModel:
    return WorkerModel(loaded.model, real_vocabulary(loaded.tokenizer), tokenizer_fingerprint(loaded.tokenizer))


def load_setup(
    config: SpecFedConfig, device: str, dtype: str, raw: bool, progress: bool = True, names: list[str] | None = None
) -> SpecFedSetup:
    """The configuration with its models loaded: all of them, or only ``names`` (a networked party's own)."""
    loaded = load_models(model_names(config) if names is None else names, device, dtype, progress)
    return SpecFedSetup(config, loaded, device, dtype, raw)


def answer_chat(setup: SpecFedSetup, text: str) -> RunReport:
    """The answer to a chat prompt, every party in this process."""
    return answer(setup, chat_prompt(setup, text), ())


def answer(setup: SpecFedSetup, prompt: list[int], stop_texts: tuple[str, ...]) -> RunReport:
    """One in-process run, measured (biases, critical path) and reported."""
    server_model = setup.server_model
    stop = stop_rule(server_model.tokenizer, server_model.model, stop_texts)
    result = run_in_process(setup.worker_models(), setup.drafter(), prompt, setup.config, stop)
    text = answer_text(stop, server_model.tokenizer, result.answer_token_ids)
    timing = {
        "wall_s": result.wall_s,
        **protocol.stage_times(result.seconds),
        "parallel_s": result.measurement.parallel_s,
    }
    return reporting.run_report(
        result.parties, setup.config, setup.model_json(), text, IN_PROCESS, timing, result.measurement
    )


def chat_prompt(setup: SpecFedSetup, text: str) -> list[int]:
    """The server's prompt: the model's chat template around ``text`` (as is with ``raw``)."""
    return checked(setup, template_prompt(setup.server_model, text, setup.raw))


def template_prompt(server: LoadedModel, text: str, raw: bool) -> list[int]:
    """``text`` in the server's chat template (as is with ``raw``), not yet checked against any model's positions."""
    if not text.strip():
        raise FedAttnError("the prompt is empty")
    return build_segments(server.tokenizer, [], text, None, raw)[0]


def plain_prompt(setup: SpecFedSetup, text: str) -> list[int]:
    """A few-shot prompt for a base model: the text as is, no template."""
    return checked(setup, tokenize_party(setup.server_model.tokenizer, [Piece(text, False)], "the prompt"))


def checked(setup: SpecFedSetup, prompt: list[int]) -> list[int]:
    """The prompt and its answer must fit every model's positions."""
    for loaded in setup.models.values():
        check_prompt_length(len(prompt), setup.config.max_new_tokens, loaded.model.config.max_position_embeddings)
    return prompt
