"""``fedattn serve`` (a party that stays up, query after query) and ``fedattn ask`` (a client,
loading no model, that asks its own party's service to run one query and prints the result as
``fedattn run`` does).

Both are system-neutral: the system (``--system NAME``, default FedAttn; the parser holds that
system's options, as for ``eval``: ``cli.main.parse_words``) gives its options, its query handler and
what an asker sends (``fedattn.systems.base.System``); the service layer is ``fedattn.network.service``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from fedattn.argtypes import name_list, text_or_file
from fedattn.cli import refine, specfed, split
from fedattn.cli.run import print_report
from fedattn.systems import DEFAULT_SYSTEM, SYSTEMS, get_system

STOP_POLL_S = 0.5


def _federation_options(parser: argparse.ArgumentParser, system: str) -> None:
    parser.add_argument(
        "--system",
        choices=tuple(SYSTEMS),
        default=system,
        help=f"whose queries (default {DEFAULT_SYSTEM}); the system options here are {system}'s, "
        "and --system NAME gives NAME's instead",
    )
    parser.add_argument("--roster", type=Path, required=True, metavar="FILE", help="the federation's roster.toml")
    parser.add_argument("--name", required=True, help="this party's name in the roster (its certificate's)")


def add_serve_arguments(parser: argparse.ArgumentParser, system: str = DEFAULT_SYSTEM) -> None:
    _federation_options(parser, system)
    parser.add_argument(
        "--context", type=text_or_file, metavar="TEXT|@FILE", help="this party's own document (read once; none to ask)"
    )
    get_system(system).add_serve_options(parser)


def add_ask_arguments(parser: argparse.ArgumentParser, system: str = DEFAULT_SYSTEM) -> None:
    _federation_options(parser, system)
    parser.add_argument(
        "--parties",
        type=name_list,
        metavar="A,B,...",
        help="the other parties in rank order (default: every other party of the roster; SpecFed: the workers); "
        "the asker is last",
    )
    get_system(system).add_ask_options(parser)


def serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM (exit 0) or Ctrl-C (exit 130), one log line per query on stderr."""
    from fedattn.network.federation import load_roster
    from fedattn.network.service import Service

    roster = load_roster(args.roster)
    credentials = roster.credentials(args.name)
    system = get_system(args.system)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=f"fedattn serve {args.name}: %(message)s")
    log = logging.getLogger("fedattn.serve")
    handler = system.serve_handler(args, args.context)
    try:
        service = Service(roster, args.name, credentials, handler)
        try:
            log.info("serving %s at %s", system.name, roster.entry(args.name).address)
            while not stop.wait(STOP_POLL_S):
                pass
        finally:
            service.close()
    finally:
        handler.close()
    log.info("stopped")
    return 0


def ask(args: argparse.Namespace) -> int:
    from fedattn.network.federation import load_roster
    from fedattn.network.service import ask as ask_service
    from fedattn.report.schema import RunReport

    roster = load_roster(args.roster)
    credentials = roster.credentials(args.name)
    words, private = get_system(args.system).ask_input(args)
    parties = [*args.parties, args.name] if args.parties else None
    document = ask_service(roster, args.name, credentials, parties, words, private)
    printers = {"specfed": specfed.print_report, "split": split.print_report, "refine": refine.print_report}
    printer = printers.get(args.system, print_report)
    printer(RunReport.from_json(document), args.json)
    return 0
