"""SpecFed's compressions on real answers: bias per byte of top-K, adaptive K and the encodings.

Reads a results folder of an uncompressed greedy SpecFed evaluation (``fedattn eval gsm8k --system
specfed --top-k all ...``), and for each of its problems teacher-forces every worker and the draft
over the prompt and the ensemble's own answer (one forward pass each), then puts every position
through each compression's real path (``fedattn.systems.specfed.fidelity``): the aggregation bias
||p_hat - p||_1 and the residual mass sum_i w_i eps_i (spec bound: bias <= 2 x residual), the
acceptance-rate bias against the draft (bound: <= residual), the record bytes per position (all
workers), and the argmax agreement. An agreement of 1.0 over a problem means greedy SpecFed with
that compression decodes exactly the ensemble's answer (the same argmax at every position of the
same path), so its exact match equals the ensemble's on that problem: the column ``same answers``
counts those problems. The baseline, full float32 distributions, is the first row.

    .venv/bin/python bench/specfed_fidelity.py /work/runs/specfed/ensemble-full --out fidelity.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from fedattn.evaluation.tasks import gsm8k
from fedattn.runtime.prompting import real_vocabulary
from fedattn.systems.specfed.config import SpecFedConfig, WorkerSpec
from fedattn.systems.specfed.fidelity import measure, teacher_forced
from fedattn.systems.specfed.query import load_setup, plain_prompt

ONE_PERCENT = 1517  # about 1% of Qwen2.5's 151,665 tokens
COMPRESSIONS = [  # (label, changes to the run's configuration)
    ("full f32 (baseline)", {"top_k": None}),
    *[
        (f"K={k} {mode}", {"top_k": k, "reconstruct": mode})
        for k in (1, 8, 64, ONE_PERCENT)
        for mode in ("renormalize", "redistribute")
    ],
    ("K=64 redistribute f16", {"top_k": 64, "encoding": "f16"}),
    ("K=64 redistribute packed", {"top_k": 64, "encoding": "packed"}),
    (f"K={ONE_PERCENT} redistribute packed", {"top_k": ONE_PERCENT, "encoding": "packed"}),
    (f"adaptive eps=0.01 cap {ONE_PERCENT}", {"top_k": ONE_PERCENT, "adaptive_eps": 0.01}),
    (f"adaptive eps=0.05 cap {ONE_PERCENT}", {"top_k": ONE_PERCENT, "adaptive_eps": 0.05}),
    (f"adaptive eps=0.01 cap {ONE_PERCENT} packed", {"top_k": ONE_PERCENT, "adaptive_eps": 0.01, "encoding": "packed"}),
]


def stored_config(folder: Path) -> SpecFedConfig:
    system = json.loads((folder / "config.json").read_text())["system"]
    workers = tuple(WorkerSpec(worker["model"], worker["weight"]) for worker in system["workers"])
    fields = {key: system[key] for key in SpecFedConfig.__dataclass_fields__ if key != "workers"}
    return SpecFedConfig(workers=workers, **fields)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a folder of an uncompressed greedy SpecFed GSM8K evaluation")
    parser.add_argument("--temperature", type=float, default=1.0, help="of the distributions compared (default 1)")
    parser.add_argument("--limit", type=int, help="the first N problems of the folder")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    config = stored_config(args.results)
    task = json.loads((args.results / "config.json").read_text())["task"]
    records = [json.loads(line) for line in (args.results / "records.jsonl").read_text().splitlines()]
    records = records[: args.limit]
    setup = load_setup(replace(config, temperature=args.temperature), "cpu", "float32", raw=True)
    vocab = real_vocabulary(setup.server_model.tokenizer)
    sums: dict[str, list] = {label: [] for label, _ in COMPRESSIONS}
    for number, record in enumerate(records, start=1):
        prompt = gsm8k.few_shot_prompt(record["index"], task["shots"])
        ids = plain_prompt(setup, prompt.text)
        sequence = ids + record["report"]["answer_token_ids"]
        truths = [
            teacher_forced(setup.models[worker.model].model, sequence, len(ids), vocab, args.temperature)
            for worker in config.workers
        ]
        draft = setup.models[config.draft].model
        q = teacher_forced(draft, sequence, len(ids), vocab, args.temperature)
        for label, changes in COMPRESSIONS:
            sums[label].append(measure(truths, q, replace(config, **changes), vocab))
        print(f"problem {number}/{len(records)}: {len(sequence) - len(ids)} positions", file=sys.stderr)
    rows = {label: summarize(figures) for label, figures in sums.items()}
    print_table(rows, len(records))
    if args.out:
        args.out.write_text(
            json.dumps({"temperature": args.temperature, "problems": len(records), "rows": rows}, indent=2)
        )
    return 0


def summarize(figures: list) -> dict:
    """Means over problems (each a mean over its positions), and problems decoded identically."""
    keys = ("aggregation_bias", "residual_mass", "acceptance_bias", "bytes_per_position", "argmax_agreement")
    row = {key: float(torch.tensor([asdict(figure)[key] for figure in figures]).mean()) for key in keys}
    row["same_answers"] = sum(figure.argmax_agreement == 1.0 for figure in figures)
    return row


def print_table(rows: dict, problems: int) -> None:
    baseline = rows["full f32 (baseline)"]["bytes_per_position"]
    print(
        f"{'compression':40} {'bias':>8} {'2 x eps':>8} {'acc bias':>8} {'B/pos':>10} {'x fewer':>8} "
        f"{'argmax':>7} same answers"
    )
    for label, row in rows.items():
        print(
            f"{label:40} {row['aggregation_bias']:8.4f} {2 * row['residual_mass']:8.4f} "
            f"{row['acceptance_bias']:8.4f} {row['bytes_per_position']:10.0f} "
            f"{baseline / row['bytes_per_position']:8.0f} {row['argmax_agreement']:7.4f} "
            f"{row['same_answers']}/{problems}"
        )


if __name__ == "__main__":
    sys.exit(main())
