"""``fedattn eval crossfacts``: publisher exact match on CrossFacts or NarrativeQA, federated vs centralized vs alone.

Run the three modes on the same items (same --data-seed, sizes and model) into three --out
folders; federated minus alone is what collaboration gains, centralized minus federated what the
schedule loses. Modes:

* federated: each collaborator holds its document, the publisher only the question (the schedule applies);
* centralized: one party holds all documents and the question, the same prompt text (N = 1, no traffic);
* alone: the publisher with the question only (N = 1, no traffic).

Sources (``--source``): ``crossfacts`` (default) generates records with similar-name distractors
(``crossfacts.py``; ``--facts`` sets the people per document); ``narrativeqa`` gives each
collaborator a different real story summary and asks about one of them (``narrativeqa.py``; needs
``make narrativeqa``). ``--facts`` with ``narrativeqa`` is an error rather than silently ignored.
``--count`` is the number of items either way. The results folder's configuration holds
``facts`` for CrossFacts (as before ``--source`` existed, so older folders resume) and ``source``
and the data file's sha256 for NarrativeQA.

CrossFacts scoring (see ``normalize``): the answer's first non-empty line and the gold are
lower-cased, every punctuation character becomes a space, and both are split on whitespace. EM is
1 when the gold's tokens occur as a contiguous run in the answer's tokens ("The code is QT3840." matches "QT3840";
"QT 3840" and "QT38400" do not; "2020-03-01" matches "2020/03/01"); F1 is the token-overlap F1 of
the same two token lists.

NarrativeQA scoring (see ``squad_normalize``), the usual SQuAD rules: the answer's first non-empty
line and each reference are lower-cased, punctuation is deleted, the articles a/an/the are removed
and whitespace splits the rest. EM is 1 when the answer's tokens equal some reference's; F1 is the
best token-overlap F1 over the references.
"""

from __future__ import annotations

import argparse
import json
import re
import string
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from fedattn.errors import FedAttnError
from fedattn.evaluation.tasks import narrativeqa
from fedattn.evaluation.tasks.crossfacts import VIEWS, Item, check_sizes, generate_item
from fedattn.report.render import progress_bar

DEFAULT_MAX_NEW_TOKENS = 32  # gold answers are a few tokens; the first line is all that is scored
DEFAULT_FACTS = 4
SOURCES = ("crossfacts", "narrativeqa")
SCORING = {
    "crossfacts": "EM: normalized gold tokens contiguous in the answer's first line; F1: token overlap",
    "narrativeqa": "SQuAD-normalized first line: EM equal to a reference, F1 token overlap; best over references",
}
_PUNCTUATION = str.maketrans({char: " " for char in string.punctuation})
_DELETE_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The shared model/schedule/decoding options plus the benchmark's own."""
    from fedattn.argtypes import non_negative_int, positive_int
    from fedattn.systems.fedattn.config import add_options

    add_options(parser)
    parser.set_defaults(max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument(
        "--source",
        choices=SOURCES,
        default="crossfacts",
        help="generated records or NarrativeQA stories (default crossfacts)",
    )
    parser.add_argument("--count", type=positive_int, default=100, help="items generated or drawn (default 100)")
    parser.add_argument("--parties", type=positive_int, default=3, help="parties including the publisher (default 3)")
    parser.add_argument(
        "--facts",
        type=positive_int,
        help=f"crossfacts only: people (4 facts each) per collaborator's document (default {DEFAULT_FACTS})",
    )
    parser.add_argument(
        "--data-seed", type=int, default=0, help="seed of the generated items (--seed is the sampling seed)"
    )
    parser.add_argument("--offset", type=non_negative_int, default=0, help="first item to evaluate")
    parser.add_argument("--limit", type=positive_int, help="evaluate at most this many items from --offset")
    parser.add_argument("--mode", choices=tuple(VIEWS), default="federated", help="who holds what (default federated)")
    parser.add_argument(
        "--out", type=Path, required=True, help="results folder (records.jsonl, summary.json); reruns resume"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=16, metavar="B", help="items decoded together (default 16)"
    )


def normalize(text: str) -> list[str]:
    """Lower-case tokens of ``text`` with punctuation turned into spaces."""
    return text.lower().translate(_PUNCTUATION).split()


def first_line(answer: str) -> str:
    return next((line for line in answer.splitlines() if line.strip()), "")


def exact_match(answer: str, gold: str) -> bool:
    """The gold's tokens as a contiguous run in the answer's first line."""
    predicted, wanted = normalize(first_line(answer)), normalize(gold)
    return any(predicted[start : start + len(wanted)] == wanted for start in range(len(predicted) - len(wanted) + 1))


def f1_score(answer: str, gold: str) -> float:
    return _overlap_f1(normalize(first_line(answer)), normalize(gold))


def squad_normalize(text: str) -> list[str]:
    """SQuAD's normalization as tokens: lower case, punctuation deleted, articles removed."""
    return _ARTICLES.sub(" ", text.lower().translate(_DELETE_PUNCTUATION)).split()


def squad_exact_match(answer: str, references: tuple[str, ...]) -> bool:
    """The answer's first line equals some reference once both are normalized."""
    predicted = squad_normalize(first_line(answer))
    return any(predicted == squad_normalize(reference) for reference in references)


def squad_f1(answer: str, references: tuple[str, ...]) -> float:
    """The best token-overlap F1 of the answer's first line against any reference."""
    predicted = squad_normalize(first_line(answer))
    return max((_overlap_f1(predicted, squad_normalize(reference)) for reference in references), default=0.0)


def score(source: str, answer: str, item: Item) -> tuple[int, float]:
    """(EM, F1) of ``answer`` by the source's rules."""
    if source == "narrativeqa":
        return int(squad_exact_match(answer, item.golds)), squad_f1(answer, item.golds)
    return int(exact_match(answer, item.answer)), f1_score(answer, item.answer)


def _overlap_f1(predicted: list[str], wanted: list[str]) -> float:
    common = sum((Counter(predicted) & Counter(wanted)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class ItemSource:
    """Where the items come from: item ``index`` of the run, and what identifies the data in the folder's config."""

    item: Callable[[int], Item]
    guard: dict  # merged into the results folder's configuration


def item_source(args: argparse.Namespace) -> ItemSource:
    """The --source's items for --data-seed/--count/--parties, sizes checked before any model is loaded."""
    if args.source == "narrativeqa":
        if args.facts is not None:
            raise FedAttnError("--facts applies to --source crossfacts only (a NarrativeQA document is a whole story)")
        dataset = narrativeqa.load()
        narrativeqa.check_sizes(args.count, args.parties, dataset)
        guard = {"source": "narrativeqa", "data_sha256": dataset.sha256}
        return ItemSource(lambda index: narrativeqa.generate_item(args.data_seed, index, args.parties), guard)
    facts = DEFAULT_FACTS if args.facts is None else args.facts
    check_sizes(args.count, args.parties, facts)
    # no "source" key: CrossFacts folders written before --source existed keep resuming
    return ItemSource(lambda index: generate_item(args.data_seed, index, args.parties, facts), {"facts": facts})


def run(args: argparse.Namespace) -> int:
    """Evaluate the selected items not yet in --out, then write and print the summary."""
    from fedattn.systems.fedattn.config import configure

    source = item_source(args)
    if args.offset >= args.count:
        raise FedAttnError(f"--offset {args.offset} is past the last item ({args.count - 1})")
    loaded, config, device = configure(args)
    store = _store(args, source, loaded, config)
    done = store.done_keys()
    stop_at = args.count if args.limit is None else min(args.count, args.offset + args.limit)
    todo = [index for index in range(args.offset, stop_at) if str(index) not in done]
    with progress_bar(f"{args.source} {args.mode} on {device}", len(todo), quiet=args.json) as advance:
        for first in range(0, len(todo), args.batch_size):
            batch = todo[first : first + args.batch_size]
            for record in evaluate_items(loaded, config, args, batch, [source.item(index) for index in batch]):
                store.append(record)
            advance(len(batch))
    summary = summarize(store.records())
    path = store.write_summary(summary)
    if args.json:
        print(json.dumps(summary | {"config": store.config, "summary_path": str(path)}, indent=2))
    else:
        print(summary_line(summary, args, path))
    return 0


def _store(args: argparse.Namespace, source: ItemSource, loaded, config):
    """The results folder, guarded by everything that decides a record (not offset/limit)."""
    from fedattn.evaluation.results import ResultStore

    schedule = config.schedule
    return ResultStore(
        args.out,
        {
            "benchmark": "crossfacts",
            **source.guard,
            "mode": args.mode,
            "data_seed": args.data_seed,
            "count": args.count,
            "parties": args.parties,
            "model": {"name": loaded.name, "identity": loaded.identity, "dtype": args.dtype},
            "schedule": {
                "describe": schedule.describe(),
                "sync_layers": list(schedule.sync_layers),
                "publisher_layers": list(schedule.publisher_layers),
                "publisher_sync_every": schedule.publisher_sync_every,
                "num_layers": schedule.num_layers,
            },
            "sparsity": asdict(config.sparsity),
            "kv_codec": config.codec.name,
            "kv_exchange": asdict(config.exchange),
            "decoding": asdict(config.decoding),
            "max_new_tokens": config.max_new_tokens,
            "raw": args.raw,
            "scoring": SCORING[args.source],
        },
    )


def evaluate_items(loaded, config, args: argparse.Namespace, indices: list[int], items: list[Item]) -> list[dict]:
    """Items in ``args.mode``: segments, one in-process run each with decoding batched, scores and
    traffic. A record's ``decode_s`` and ``wall_s`` are its share of the batch's time."""
    from fedattn.runtime.prompting import build_segments, check_context_window
    from fedattn.systems.fedattn.inprocess import run_many_in_process
    from fedattn.systems.fedattn.query import stop_rule

    model, tokenizer = loaded.model, loaded.tokenizer
    start = time.perf_counter()
    queries = []
    for item in items:
        view = VIEWS[args.mode](item)
        queries.append(build_segments(tokenizer, list(view.contexts), view.question, view.publisher_context, args.raw))
        check_context_window(queries[-1], config.max_new_tokens, model.config.max_position_embeddings)
    results = run_many_in_process(model, queries, config, stop_rule(tokenizer, model), loaded.identity)
    wall_s = (time.perf_counter() - start) / len(items)
    return [
        _record(loaded, config, args, index, item, segments, result) | {"wall_s": wall_s}
        for index, item, segments, result in zip(indices, items, queries, results)
    ]


def _record(
    loaded, config, args: argparse.Namespace, index: int, item: Item, segments: list[list[int]], result
) -> dict:
    """One item's answer, score, traffic (measured and predicted) and times."""
    from fedattn.runtime.dims import ModelDims
    from fedattn.systems.fedattn.costs import run_costs

    expected = run_costs(ModelDims.from_config(loaded.model.config), config, [len(segment) for segment in segments])
    answer = loaded.tokenizer.decode(result.answer_token_ids, skip_special_tokens=True).strip()
    em, f1 = score(args.source, answer, item)
    return {
        "key": str(index),
        "index": index,
        "field": item.field,
        "holder_party": item.holder_party,
        "question": item.question,
        "gold": item.answer,
        "references": list(item.golds),
        "answer": answer,
        "em": em,
        "f1": f1,
        "segment_tokens": [len(segment) for segment in segments],
        "bytes_sent": sum(party.bytes_sent for party in result.parties),
        "bytes_received": sum(party.bytes_received for party in result.parties),
        "expected_bytes_sent": sum(cost.wire_bytes_sent for cost in expected),
        "expected_bytes_received": sum(cost.wire_bytes_received for cost in expected),
        "publisher_bytes_received": result.parties[-1].bytes_received,
        "generated_tokens": len(result.answer_token_ids),
        "prefill_s": result.prefill_s,
        "decode_s": result.decode_s,
    }


def summarize(records: list[dict]) -> dict:
    """Means over every finished record in the folder (all runs of this configuration so far)."""
    count = len(records)

    def mean(key: str) -> float:
        return sum(record[key] for record in records) / count if count else 0.0

    return {
        "items": count,
        "em": mean("em"),
        "f1": mean("f1"),
        "em_by_field": _em_by(records, "field"),
        "mean_bytes_sent": mean("bytes_sent"),
        "mean_bytes_received": mean("bytes_received"),
        "mean_expected_bytes_sent": mean("expected_bytes_sent"),
        "mean_wall_s": mean("wall_s"),
        "total_s": sum(record["wall_s"] for record in records),
    }


def _em_by(records: list[dict], key: str) -> dict[str, float]:
    groups: dict[str, list[int]] = {}
    for record in records:
        groups.setdefault(str(record[key]), []).append(record["em"])
    return {name: sum(values) / len(values) for name, values in sorted(groups.items())}


def summary_line(summary: dict, args: argparse.Namespace, path: Path) -> str:
    return (
        f"{args.source} {args.mode}, {args.parties} parties: EM {summary['em']:.1%}, F1 {summary['f1']:.1%} "
        f"over {summary['items']} items; {summary['mean_bytes_sent'] / 1e6:.2f} MB sent per query; "
        f"{summary['total_s']:.1f} s in all -> {path}"
    )
