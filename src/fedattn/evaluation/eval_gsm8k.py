"""``fedattn eval gsm8k``: exact match on GSM8K test problems with the prompt split among N parties.

As in the paper: a raw base-model prompt (no chat template, whatever --raw says) made of the
first K train problems as fixed chain-of-thought exemplars, then the test question; the split
(TokAg, SemAg, TokEx, SemEx) decides who holds what. Each problem runs all parties in this
process, stops at EOS or at the model's next "Question:", and is scored by the paper's EM.
Problems are prefilled one by one and decoded --batch-size at a time (every answer of every
problem in the batch shares each forward pass; on a CPU that multiplies decoding throughput).

Every finished problem is one record in ``--out`` (so an interrupted run resumes where it
stopped); the summary covers every record there. A folder holding results of another
configuration (model, split, N, shots, schedule, sparsity, decoding...) is refused.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from statistics import mean

from fedattn.errors import FedAttnError
from fedattn.evaluation.results import ResultStore
from fedattn.evaluation.tasks import gsm8k
from fedattn.evaluation.tasks.gsm8k_scoring import extract_answer, is_correct
from fedattn.report.render import format_bytes, progress_bar
from fedattn.runtime.decoding import StopRule
from fedattn.runtime.dims import ModelDims
from fedattn.runtime.models import LoadedModel
from fedattn.runtime.prompting import check_context_window
from fedattn.systems.fedattn.config import RunConfig
from fedattn.systems.fedattn.costs import PartyCost, run_costs
from fedattn.systems.fedattn.inprocess import RunResult, party_names, run_many_in_process
from fedattn.systems.fedattn.query import stop_rule
from fedattn.systems.fedattn.splits import SPLITS, split_prompt

STOP_TEXTS = ("\nQuestion:", "Question:")  # the model starting the next few-shot item
PAPER_MAX_NEW_TOKENS = 256
PUBLISHER = "publisher"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The shared model/schedule/sparsity/decoding options, then the evaluation's own."""
    from fedattn.argtypes import non_negative_int, positive_int
    from fedattn.systems.fedattn.config import add_options

    add_options(parser)
    parser.set_defaults(max_new_tokens=PAPER_MAX_NEW_TOKENS)
    parser.add_argument(
        "--split", choices=SPLITS, default="TokEx", help="how the prompt is dealt to the parties (default TokEx)"
    )
    parser.add_argument(
        "--parties",
        type=positive_int,
        default=4,
        metavar="N",
        help="parties, the publisher included; 1 = centralized (default 4)",
    )
    parser.add_argument(
        "--shots",
        type=non_negative_int,
        default=4,
        metavar="K",
        help="exemplars: the first K GSM8K train problems (default 4)",
    )
    parser.add_argument(
        "--limit", type=positive_int, metavar="M", help="evaluate M test problems (default: all from --offset)"
    )
    parser.add_argument("--offset", type=non_negative_int, default=0, help="first test problem (default 0)")
    parser.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="records, summary and configuration; rerun to resume"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=8, metavar="B", help="problems decoded together (default 8)"
    )
    parser.add_argument(
        "--every-answer",
        action="store_true",
        help="decode and score every participant's answer, not only the publisher's",
    )


def run(args: argparse.Namespace) -> int:
    """Evaluate the problems not yet in --out, write the summary, print it; 0 on success."""
    from fedattn.systems.fedattn.config import configure

    args.all_answers = args.all_answers or args.every_answer
    test = gsm8k.load("test")
    exemplars = _exemplars(gsm8k.load("train"), args.shots)
    indices = _problem_range(len(test), args.offset, args.limit)
    loaded, config, device = configure(args)
    # refuse an impossible split before the results folder records this configuration
    split_prompt(loaded.tokenizer, exemplars, gsm8k.question_text(test[indices[0]]), args.split, args.parties)
    store = ResultStore(args.out, run_configuration(args, loaded, config))
    stop = stop_rule(loaded.tokenizer, loaded.model, STOP_TEXTS)
    done = store.done_keys()
    todo = [index for index in indices if str(index) not in done]
    with progress_bar("GSM8K problems", len(indices), completed=len(indices) - len(todo), quiet=args.json) as advance:
        for first in range(0, len(todo), args.batch_size):
            batch = todo[first : first + args.batch_size]
            problems = [test[index] for index in batch]
            for record in evaluate_problems(loaded, config, stop, exemplars, problems, batch, args.split, args.parties):
                store.append(record)
            advance(len(batch))
    summary = summarize(store.records()) | {"device": device}
    store.write_summary(summary)
    print(
        json.dumps(summary | {"config": store.config}, indent=2)
        if args.json
        else describe(summary, store.config, store.summary_path)
    )
    return 0


def run_configuration(args: argparse.Namespace, loaded: LoadedModel, config: RunConfig) -> dict:
    """Everything that changes a record; a resumed run must match it exactly."""
    return {
        "task": "gsm8k-test",
        "prompt": "raw few-shot chain of thought, first K train problems",
        "stop_texts": list(STOP_TEXTS),
        "model": {"name": loaded.name, "identity": loaded.identity},
        "dtype": args.dtype,
        "kv_codec": config.codec.name,
        "kv_exchange": asdict(config.exchange),
        "split": args.split,
        "parties": args.parties,
        "shots": args.shots,
        "schedule": asdict(config.schedule)  # tuples as JSON reads them back
        | {
            "sync_layers": list(config.schedule.sync_layers),
            "publisher_layers": list(config.schedule.publisher_layers),
        },
        "sparsity": asdict(config.sparsity),
        "decoding": asdict(config.decoding),
        "max_new_tokens": config.max_new_tokens,
        "all_answers": config.all_answers,
    }


def evaluate_problems(
    loaded: LoadedModel,
    config: RunConfig,
    stop: StopRule,
    exemplars: list[str],
    problems: list[gsm8k.Problem],
    indices: list[int],
    split: str,
    parties: int,
) -> list[dict]:
    """Test problems end to end (split, run with decoding batched, score); their records.

    A record's ``decode_s`` and ``wall_s`` are its share of the batch's time."""
    start = time.perf_counter()
    queries = [
        split_prompt(loaded.tokenizer, exemplars, gsm8k.question_text(problem), split, parties) for problem in problems
    ]
    for segments in queries:
        check_context_window(segments, config.max_new_tokens, loaded.model.config.max_position_embeddings)
    results = run_many_in_process(loaded.model, queries, config, stop, loaded.identity)
    wall_s = (time.perf_counter() - start) / len(problems)
    return [
        _record(loaded, config, stop, problem, index, segments, result)
        | {"wall_s": wall_s, "batch_size": len(problems)}
        for problem, index, segments, result in zip(problems, indices, queries, results)
    ]


def _record(
    loaded: LoadedModel,
    config: RunConfig,
    stop: StopRule,
    problem: gsm8k.Problem,
    index: int,
    segments: list[list[int]],
    result: RunResult,
) -> dict:
    """One problem's answers, scores, traffic (measured and predicted), FLOPs and times."""
    names = party_names(len(segments))
    texts = {
        names[rank]: stop.trim(loaded.tokenizer.decode(ids, skip_special_tokens=True))
        for rank, ids in result.answers.items()
    }
    lengths = [len(segment) for segment in segments]
    dims = ModelDims.from_config(loaded.model.config)
    expected = run_costs(dims, config, lengths)
    return {
        "key": str(index),
        "index": index,
        "gold": problem.answer,
        "segment_lengths": lengths,
        "answers": texts,
        "extracted": {name: extract_answer(text) for name, text in texts.items()},
        "correct": {name: is_correct(text, problem.answer) for name, text in texts.items()},
        "new_tokens": {names[rank]: len(ids) for rank, ids in result.answers.items()},
        "bytes_sent": {report.name: report.bytes_sent for report in result.parties},
        "bytes_received": {report.name: report.bytes_received for report in result.parties},
        "expected_bytes_sent": {name: cost.wire_bytes_sent for name, cost in zip(names, expected)},
        "expected_bytes_received": {name: cost.wire_bytes_received for name, cost in zip(names, expected)},
        "flops": _flops(result, expected, dims),
        "prefill_s": result.prefill_s,
        "decode_s": result.decode_s,
    }


def summarize(records: list[dict]) -> dict:
    """EM of the publisher, of each party, their average and the best collaborator; traffic,
    FLOPs and time per query."""
    party_em = _party_em(records)
    collaborators = {name: em for name, em in party_em.items() if name != PUBLISHER}
    best = max(collaborators, key=collaborators.__getitem__, default=None)
    sent = [sum(record["bytes_sent"].values()) for record in records]
    decode_s = sum(record["decode_s"] for record in records)
    new_tokens = sum(sum(record["new_tokens"].values()) for record in records)
    return {
        "count": len(records),
        "em": {
            "publisher": party_em[PUBLISHER],
            "parties": party_em,
            "average": mean(party_em.values()),
            "best_collaborator": None if best is None else {"name": best, "em": collaborators[best]},
        },
        "bytes": {
            "total_sent": sum(sent),
            "mean_sent_per_query": mean(sent),
            "mean_expected_sent_per_query": mean(sum(record["expected_bytes_sent"].values()) for record in records),
        },
        "mean_flops_per_query": mean(record["flops"] for record in records),
        "time": {
            "total_s": sum(record["wall_s"] for record in records),
            "prefill_s": sum(record["prefill_s"] for record in records),
            "decode_s": decode_s,
            "new_tokens": new_tokens,
            "tokens_per_s": new_tokens / decode_s if decode_s > 0 else 0.0,
        },
    }


def describe(summary: dict, config: dict, path: Path) -> str:
    """The summary as one paragraph for a person."""
    em, traffic, timing = summary["em"], summary["bytes"], summary["time"]
    text = (
        f"GSM8K {config['split']} with {config['parties']} parties, {config['shots']}-shot, "
        f"{config['model']['name']}, sync blocks {config['schedule']['sync_layers']}: "
        f"publisher EM {em['publisher']:.1%} over {summary['count']} problems"
    )
    if em["best_collaborator"] is not None:
        best = em["best_collaborator"]
        text += f"; average over all parties {em['average']:.1%}, best collaborator {best['name']} {best['em']:.1%}"
    return text + (
        f". Per query {format_bytes(traffic['mean_sent_per_query'])} sent "
        f"(cost model {format_bytes(traffic['mean_expected_sent_per_query'])}), "
        f"{summary['mean_flops_per_query']:.3g} FLOPs; {timing['total_s']:.1f} s in all, "
        f"{timing['tokens_per_s']:.1f} new tokens/s while decoding. Summary: {path}"
    )


def _party_em(records: list[dict]) -> dict[str, float]:
    """EM per party that answered, in party order (collaborators, then the publisher)."""
    names = party_names(len(records[0]["segment_lengths"]))
    scores = {name: [record["correct"][name] for record in records if name in record["correct"]] for name in names}
    return {name: mean(values) for name, values in scores.items() if values}


def _flops(result: RunResult, expected: list[PartyCost], dims: ModelDims) -> float:
    """Expected prefill FLOPs of every party plus the decode FLOPs of every party that answered."""
    decode = sum(expected[rank].decode_flops(dims, max(len(ids) - 1, 0)) for rank, ids in result.answers.items())
    return sum(cost.prefill_flops for cost in expected) + decode


def _exemplars(train: list[gsm8k.Problem], shots: int) -> list[str]:
    if shots > len(train):
        raise FedAttnError(f"--shots {shots} exceeds the {len(train)} GSM8K train problems")
    return [gsm8k.exemplar_text(problem) for problem in train[:shots]]


def _problem_range(count: int, offset: int, limit: int | None) -> range:
    if offset >= count:
        raise FedAttnError(f"--offset {offset} is past the last of the {count} GSM8K test problems")
    return range(offset, count if limit is None else min(count, offset + limit))
