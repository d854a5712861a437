"""``fedattn models`` and ``fedattn install``: which models this machine has, and getting one."""

from __future__ import annotations

import argparse


def add_install_arguments(parser: argparse.ArgumentParser) -> None:
    from fedattn.runtime.models import DEFAULT_MODEL

    parser.add_argument("name", nargs="?", default=DEFAULT_MODEL)


def list_models(args: argparse.Namespace) -> int:
    from fedattn.report.render import print_models
    from fedattn.runtime.models import model_status

    print_models(model_status())
    return 0


def install(args: argparse.Namespace) -> int:
    from fedattn.runtime.models import install_model

    path = install_model(args.name, progress=True)
    print(f"{args.name}: ready in {path}")
    return 0
