"""``fedattn eval drift``: how far federated prefill strays from centralized inference, block by block.

The paper's error-propagation view: local blocks let each party's hidden states drift from what
centralized inference would compute, and sync blocks pull them back. We run the engine's own
in-process prefill (so what is measured is what ``fedattn run`` computes), record every block's
output and K/V projections with forward hooks, run one ordinary forward over the concatenated
prompt with the same hooks, and compare at each party's own token positions.

K is taken at the ``k_proj`` output, before rotary embedding. Both runs rotate a token's key by the
same position-dependent orthogonal rotation, so the relative deviation equals the post-RoPE one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedattn.errors import FedAttnError
from fedattn.systems.fedattn.config import RunConfig
from fedattn.systems.fedattn.inprocess import party_names, run_in_process

if TYPE_CHECKING:
    from fedattn.evaluation.plots import Drawn


@dataclass
class BlockCapture:
    """One block of one forward pass: global positions, block output, K and V projections."""

    positions: torch.Tensor
    hidden: torch.Tensor | None = None
    key: torch.Tensor | None = None
    value: torch.Tensor | None = None


@dataclass
class PartyDrift:
    """Per block, ||fed - central|| / ||central|| over this party's (kept) token positions."""

    name: str
    tokens: int  # positions compared: its kept tokens
    hidden: list[float]
    key: list[float]
    value: list[float]


@dataclass
class DriftReport:
    schedule: str
    sync_layers: list[int]
    publisher_sync_layers: list[int]
    parties: list[PartyDrift]
    kl_publisher: float  # KL(p_central || p_fed) of the next token at the last prompt position
    key_measured_at: str = "k_proj output (pre-RoPE; equal to post-RoPE since RoPE is orthogonal)"

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class _Recorder:
    """Collects ``BlockCapture``s of every forward pass through the hooked layers, in call order.

    A pass starts at block 0; the engine prefills party after party, so pass n is party n.
    """

    passes: list[list[BlockCapture]] = field(default_factory=list)

    def begin_block(self, layer: int, positions: torch.Tensor) -> None:
        if layer == 0:
            self.passes.append([])
        self.passes[-1].append(BlockCapture(positions.detach().reshape(-1)))

    def set(self, what: str, output: torch.Tensor) -> None:
        setattr(self.passes[-1][-1], what, output.detach()[0].float())


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    layers = getattr(model.base_model, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise FedAttnError("drift needs a decoder with base_model.layers[l].self_attn (Llama/Qwen style)")
    return list(layers)


@contextmanager
def _recording(model: torch.nn.Module) -> Iterator[_Recorder]:
    """Hooks on every decoder layer and its k_proj / v_proj, removed on exit."""
    recorder = _Recorder()
    handles = []
    for index, layer in enumerate(_decoder_layers(model)):

        def before(module, args, kwargs, index=index):
            recorder.begin_block(index, kwargs["position_ids"])

        handles.append(layer.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(layer.register_forward_hook(lambda m, a, out: recorder.set("hidden", _tensor(out))))
        handles.append(layer.self_attn.k_proj.register_forward_hook(lambda m, a, out: recorder.set("key", out)))
        handles.append(layer.self_attn.v_proj.register_forward_hook(lambda m, a, out: recorder.set("value", out)))
    try:
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


def _tensor(output: torch.Tensor | tuple) -> torch.Tensor:
    """A decoder layer returns its hidden states, bare or (in older transformers) first in a tuple."""
    return output[0] if isinstance(output, tuple) else output


@torch.inference_mode()
def _centralized(model: torch.nn.Module, segments: list[list[int]]) -> tuple[list[BlockCapture], torch.Tensor]:
    """The reference: one ordinary forward (the model's own attention) over the whole prompt."""
    ids = torch.tensor([token for segment in segments for token in segment], device=model.device).unsqueeze(0)
    positions = torch.arange(ids.shape[1], device=model.device).unsqueeze(0)
    with _recording(model) as recorder:
        output = model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=1)
    return recorder.passes[0], output.logits[0, -1].float()


def _federated(
    model: torch.nn.Module, segments: list[list[int]], config: RunConfig
) -> tuple[list[list[BlockCapture]], torch.Tensor]:
    """The engine's prefill only (one token, publisher's answer), with the publisher's logits kept."""
    prefill_only = replace(config, max_new_tokens=1, record_logits=True, all_answers=False)
    with _recording(model) as recorder:
        result = run_in_process(model, segments, prefill_only)
    if len(recorder.passes) != len(segments):
        raise RuntimeError(f"expected one prefill pass per party, recorded {len(recorder.passes)}")
    return recorder.passes, result.answer_logits[0]


def _relative(federated: torch.Tensor, central: torch.Tensor) -> float:
    return float(torch.linalg.norm(federated - central) / torch.linalg.norm(central).clamp_min(1e-30))


def _party_drift(name: str, blocks: list[BlockCapture], central: list[BlockCapture]) -> PartyDrift:
    """Compare at this party's own positions (its kept tokens under sparse local attention)."""
    deviations: dict[str, list[float]] = {"hidden": [], "key": [], "value": []}
    for fed, ref in zip(blocks, central):
        rows = fed.positions.to(ref.hidden.device)
        for what, values in deviations.items():
            values.append(_relative(getattr(fed, what), getattr(ref, what)[rows]))
    return PartyDrift(name, len(blocks[0].positions), deviations["hidden"], deviations["key"], deviations["value"])


def kl_divergence(central_logits: torch.Tensor, federated_logits: torch.Tensor) -> float:
    """KL(p_central || p_fed) in nats, computed in float64 (clamped at 0 against rounding)."""
    log_p = torch.log_softmax(central_logits.double(), dim=-1)
    log_q = torch.log_softmax(federated_logits.double(), dim=-1)
    return max(float((log_p.exp() * (log_p - log_q)).sum()), 0.0)


def measure_drift(model: torch.nn.Module, segments: list[list[int]], config: RunConfig) -> DriftReport:
    """Per party and block, the relative deviation of hidden states, K and V from centralized
    inference, and the KL of the publisher's next-token distribution."""
    central, central_logits = _centralized(model, segments)
    passes, federated_logits = _federated(model, segments, config)
    names = party_names(len(segments))
    schedule = config.schedule
    return DriftReport(
        schedule=schedule.describe(),
        sync_layers=list(schedule.sync_layers),
        publisher_sync_layers=list(schedule.publisher_sync_layers),
        parties=[_party_drift(name, blocks, central) for name, blocks in zip(names, passes)],
        kl_publisher=kl_divergence(central_logits, federated_logits),
    )


# -- plot ---------------------------------------------------------------------------------------
def plot_drift(report: DriftReport, out: Path, title: str = "") -> Drawn:
    """One line per party (hidden-state deviation vs block); sync blocks as vertical lines."""
    from fedattn.evaluation.plots import new_figure, save_figure

    figure, axes = new_figure()
    for layer in report.sync_layers:
        axes.axvline(layer, color="0.85", linewidth=3, zorder=0)
    for layer in report.publisher_sync_layers:
        axes.axvline(layer, color="0.85", linewidth=1, linestyle="--", zorder=0)
    for party in report.parties:
        axes.plot(range(len(party.hidden)), party.hidden, marker="o", markersize=3, label=party.name)
    axes.set_xlabel("block (grey: sync, dashed: publisher sync)")
    axes.set_ylabel("relative deviation of hidden states")
    heading = " · ".join(part for part in (title, report.schedule) if part)
    axes.set_title(f"{heading}\npublisher next token: KL(central || fed) = {report.kl_publisher:.3g} nats", fontsize=9)
    axes.legend(fontsize=8)
    return save_figure(figure, out)


# -- over several prompts ----------------------------------------------------------------------
def mean_report(reports: list[DriftReport]) -> DriftReport:
    """Per party and block, the mean deviation over prompts of one schedule (and the mean KL);
    a party's ``tokens`` are the positions compared over all of them."""
    parties = []
    for index, party in enumerate(reports[0].parties):
        same = [report.parties[index] for report in reports]
        deviations = [_mean_lists([getattr(drift, what) for drift in same]) for what in ("hidden", "key", "value")]
        parties.append(PartyDrift(party.name, sum(drift.tokens for drift in same), *deviations))
    first = reports[0]
    kl = sum(report.kl_publisher for report in reports) / len(reports)
    return DriftReport(first.schedule, first.sync_layers, first.publisher_sync_layers, parties, kl)


def _mean_lists(lists: list[list[float]]) -> list[float]:
    return [sum(values) / len(lists) for values in zip(*lists)]


def report_from_json(document: dict) -> DriftReport:
    parties = [PartyDrift(**party) for party in document["parties"]]
    fields = ("schedule", "sync_layers", "publisher_sync_layers", "kl_publisher")
    return DriftReport(**{key: document[key] for key in fields}, parties=parties)


# -- command line -------------------------------------------------------------------------------
def gsm8k_items(text: str) -> tuple[int, ...]:
    """'0', '0-9' or '0,4,7-9': GSM8K test items, in order."""
    from fedattn.evaluation.tasks import gsm8k

    count = len(gsm8k.load("test"))
    items: set[int] = set()
    try:
        for part in filter(None, (part.strip() for part in text.split(","))):
            low, _, high = part.partition("-")
            items.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise FedAttnError(f"expected K, a range K-M or a list of them, got {text!r}") from None
    wrong = [item for item in sorted(items) if not 0 <= item < count]
    if wrong or not items:
        raise FedAttnError(f"GSM8K test items are 0..{count - 1}, got {text}")
    return tuple(sorted(items))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``fedattn eval drift``: the prompt (texts like ``fedattn run``, or a GSM8K item as the
    evaluation prompts it) and the shared run options."""
    from fedattn.argtypes import add_prompt_options, library_type, output_file, positive_int
    from fedattn.systems.fedattn.config import add_options
    from fedattn.systems.fedattn.splits import SPLITS

    add_prompt_options(parser, question_required=False)
    parser.add_argument(
        "--gsm8k-item",
        type=library_type(gsm8k_items),
        metavar="K",
        help="instead of texts: GSM8K test item K (or items: 0-9, 0,4,7), prompted as by 'fedattn eval gsm8k' "
        "(raw text); several items show the mean deviation",
    )
    parser.add_argument(
        "--split", choices=SPLITS, default="TokEx", help="with --gsm8k-item: how the prompt is dealt (default TokEx)"
    )
    parser.add_argument(
        "--parties",
        type=positive_int,
        default=4,
        metavar="N",
        help="with --gsm8k-item: parties, the publisher included (default 4)",
    )
    parser.add_argument(
        "--shots",
        type=positive_int,
        default=4,
        metavar="K",
        help="with --gsm8k-item: exemplars, the first K GSM8K train problems (default 4)",
    )
    parser.add_argument("--out", type=output_file, default=Path("drift.png"), help="the plot (PNG, default drift.png)")
    parser.add_argument(
        "--results",
        type=Path,
        metavar="DIR",
        help="also keep each prompt's measurement there (records.jsonl, summary.json); reruns resume",
    )
    add_options(parser)


def gsm8k_segments(tokenizer, item: int, split: str, parties: int, shots: int) -> list[list[int]]:
    """The prompt ``fedattn eval gsm8k`` gives test item ``item`` (``gsm8k.few_shot_prompt``),
    dealt to ``parties`` by ``split``."""
    from fedattn.evaluation.tasks import gsm8k
    from fedattn.systems.fedattn.splits import split_prompt

    prompt = gsm8k.few_shot_prompt(item, shots)
    return split_prompt(tokenizer, prompt.exemplars, prompt.question, split, parties)


@dataclass(frozen=True)
class Prompts:
    """What drift measures: each prompt's key and segments (made on demand), and what identifies them."""

    keys: tuple[str, ...]
    segments: Callable[[str], list[list[int]]]
    config: dict  # part of a results folder's configuration


def _check_prompt(args: argparse.Namespace) -> None:
    """One prompt: texts or GSM8K items (refused before the model is loaded)."""
    if args.gsm8k_item is not None and (args.question is not None or args.context):
        raise FedAttnError("--gsm8k-item replaces --context/--question; give one or the other")
    if args.gsm8k_item is None and args.question is None:
        raise FedAttnError("give --question (and --context ...) or --gsm8k-item")


def _prompts(args: argparse.Namespace, tokenizer) -> Prompts:
    from fedattn.runtime.prompting import build_segments

    if args.gsm8k_item is not None:
        config = {"gsm8k": {"split": args.split, "parties": args.parties, "shots": args.shots}}
        return Prompts(
            tuple(map(str, args.gsm8k_item)),
            lambda key: gsm8k_segments(tokenizer, int(key), args.split, args.parties, args.shots),
            config,
        )
    contexts, question, publisher_context = args.context, args.question, args.publisher_context
    texts = json.dumps([contexts, question, publisher_context]).encode()
    config = {"texts_sha256": hashlib.sha256(texts).hexdigest(), "raw": args.raw}
    segments = build_segments(tokenizer, contexts, question, publisher_context, args.raw)
    return Prompts(("prompt",), lambda key: segments, config)


def print_table(report: DriftReport) -> None:
    """Blocks down, parties across: hidden, K, V deviation (--json has full precision); '*' marks
    sync, '+' publisher sync."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report.schedule} · KL(central || fed) = {report.kl_publisher:.4g} nats")
    table.add_column("block", justify="right")
    for party in report.parties:
        table.add_column(f"{party.name}\nh    K    V", justify="right", no_wrap=True)
    for layer in range(len(report.parties[0].hidden)):
        mark = "*" if layer in report.sync_layers else "+" if layer in report.publisher_sync_layers else ""
        cells = [f"{p.hidden[layer]:.2f} {p.key[layer]:.2f} {p.value[layer]:.2f}" for p in report.parties]
        table.add_row(f"{layer}{mark}", *cells)
    Console().print(table)


def run(args: argparse.Namespace) -> int:
    """Measure every prompt not yet in --results (or every prompt, without it); print and plot."""
    from fedattn.evaluation.harness import pending, run_batches
    from fedattn.evaluation.results import RecordList, ResultStore
    from fedattn.runtime.prompting import check_context_window
    from fedattn.systems.fedattn.config import configure
    from fedattn.systems.fedattn.reporting import config_json

    _check_prompt(args)
    loaded, config, _ = configure(args)
    prompts = _prompts(args, loaded.tokenizer)

    def measure(keys: list[str]) -> list[dict]:
        segments = prompts.segments(keys[0])
        check_context_window(segments, 1, loaded.model.config.max_position_embeddings)
        return [{"key": keys[0]} | measure_drift(loaded.model, segments, config).to_json()]

    if args.results is None:
        store = RecordList()
    else:
        model = {"name": loaded.name, "identity": loaded.identity}
        stored = {"model": model, "dtype": args.dtype, **config_json(config), **prompts.config}
        store = ResultStore(args.results, stored)
    with store:
        todo = pending(store, prompts.keys, lambda key: key)
        run_batches(store, todo, measure, 1, "drift: prompts measured", len(prompts.keys), quiet=args.json)
        by_key = {record["key"]: record for record in store.records()}
        report = mean_report([report_from_json(by_key[key]) for key in prompts.keys])
        if args.results is not None:
            store.write_summary(report.to_json() | {"items": len(prompts.keys)})
    written = plot_drift(report, args.out, title=loaded.name).path
    if args.json:
        print(json.dumps(report.to_json() | {"model": loaded.name, "plot": str(written)}, indent=2))
    else:
        print_table(report)
        print(f"wrote {written}")
    return 0
