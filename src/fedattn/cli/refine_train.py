"""``fedattn refine train``: train the projectors of one (receiver, sharer) pair into a folder.

The examples come only from the training sources (``evaluation.tasks.multiple_choice``: GSM8K
train, MMLU dev and validation, ARC-Easy validation, CommonsenseQA validation, Social IQa, PIQA);
the evaluation sets (ARC-Challenge, OpenBookQA, MMLU test) are refused by name. The held-out
examples are drawn from the same sources and never trained on. The run resumes in its folder.
"""

from __future__ import annotations

import argparse

from fedattn.argtypes import add_placement_options, name_list, output_folder, positive_int

DEFAULT_SOURCES = ("mmlu-dev-val", "arc-easy", "commonsenseqa", "social-iqa", "piqa")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--receiver", required=True, help="the receiver model (a known name, tiny-random, or a path)")
    parser.add_argument("--sharer", required=True, help="the sharer model whose cache the projectors read")
    parser.add_argument("--out", type=output_folder, required=True, help="the run's folder (resumed when it exists)")
    parser.add_argument(
        "--sources",
        type=name_list,
        default=list(DEFAULT_SOURCES),
        help=f"training sources, comma-separated (default {','.join(DEFAULT_SOURCES)}; gsm8k also allowed)",
    )
    parser.add_argument("--per-source", type=positive_int, default=100, help="examples drawn per source (default 100)")
    parser.add_argument(
        "--held-out", type=positive_int, default=10, help="of each source's examples, how many to hold out (default 10)"
    )
    parser.add_argument("--epochs", type=positive_int, default=2)
    parser.add_argument("--batch", type=positive_int, default=8, help="examples per optimiser step (default 8)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    parser.add_argument("--width", type=positive_int, default=96, help="projector MLP width (default 96)")
    parser.add_argument("--depth", type=positive_int, default=1, help="residual MLP blocks per projector (default 1)")
    parser.add_argument("--eval-every", type=positive_int, default=10, help="steps between held-out losses")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_placement_options(parser)


def run(args: argparse.Namespace) -> int:
    from fedattn.errors import FedAttnError

    if not 0 < args.lr < 1:
        raise FedAttnError(f"--lr must be in (0, 1), got {args.lr}")
    if args.held_out >= args.per_source:
        raise FedAttnError("--held-out must be smaller than --per-source")
    args.sources = list(dict.fromkeys(args.sources))  # a source named twice is drawn once, not its examples twice
    examples = _examples(args)  # data before models: a missing package fails in seconds
    config = _config(args)
    import torch

    from fedattn.runtime.devices import resolve_device
    from fedattn.runtime.models import load_model
    from fedattn.systems.fedrefine.training import train

    device, dtype = resolve_device(args.device), getattr(torch, args.dtype)
    receiver = load_model(args.receiver, device=device, dtype=dtype, progress=not args.quiet)
    sharer = load_model(args.sharer, device=device, dtype=dtype, progress=not args.quiet)
    projectors = train(args.out, receiver, sharer, examples, config, quiet=args.quiet)
    losses = projectors.info.training["held_out_loss"]
    print(
        f"projectors for {receiver.name} <- {sharer.name} in {args.out}: held-out loss "
        f"{losses['receiver_alone']:.4f} (receiver alone) -> {losses['final']:.4f}; "
        f"{projectors.open_gates()} of {2 * len(projectors.blocks)} gates open"
    )
    return 0


def _examples(args: argparse.Namespace):
    from fedattn.evaluation.tasks.multiple_choice import check_training_source, training_examples
    from fedattn.systems.fedrefine.training import Example

    for source in args.sources:  # an evaluation set named last is refused before the first source is read
        check_training_source(source)
    train, held_out = [], []
    for source in args.sources:
        drawn = training_examples([source], args.per_source, args.seed)
        held_out += [Example(*pair) for pair in drawn[: args.held_out]]
        train += [Example(*pair) for pair in drawn[args.held_out :]]
    return {"train": train, "held_out": held_out}


def _config(args: argparse.Namespace):
    from fedattn.systems.fedrefine.projector import ProjectorShape
    from fedattn.systems.fedrefine.training import TrainingConfig

    return TrainingConfig(
        receiver=args.receiver,
        sharer=args.sharer,
        shape=ProjectorShape(width=args.width, depth=args.depth),
        epochs=args.epochs,
        batch=args.batch,
        learning_rate=args.lr,
        eval_every=args.eval_every,
        seed=args.seed,
        data={
            "sources": list(args.sources),
            "per_source": args.per_source,
            "held_out_per_source": args.held_out,
            "dtype": args.dtype,
        },
    )
