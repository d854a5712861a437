"""``fedattn federation init DIR --parties party-1,party-2,publisher``: a throwaway CA, every party's key
and certificate, and the roster, for trials and tests (production brings its own CA: see
``fedattn.network.federation``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedattn.argtypes import name_list
from fedattn.network.federation import CA_KEY_FILE, ROSTER_FILE, default_addresses, init_federation


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    init = actions.add_parser("init", help="create a CA, per-party keys and certificates, and a roster in DIR")
    init.add_argument("folder", type=Path, metavar="DIR", help="a new or empty folder")
    init.add_argument(
        "--parties", type=name_list, required=True, metavar="A,B,...", help="the parties' names, in order"
    )
    init.add_argument(
        "--addresses",
        type=name_list,
        metavar="HOST:PORT,...",
        help="where each party's service listens, in the same order (default: 127.0.0.1:50051, :50052, ...)",
    )
    init.add_argument(
        "--may-start",
        type=name_list,
        metavar="A,...",
        help="the parties that may start queries (default: the last party, the publisher)",
    )


def run(args: argparse.Namespace) -> int:
    names = args.parties
    roster = init_federation(
        args.folder,
        names,
        args.addresses or default_addresses(len(names)),
        args.may_start or names[-1:],
    )
    print(f"federation of {len(names)} parties in {args.folder}: roster {args.folder / ROSTER_FILE}")
    for party in roster.parties:
        starts = ", may start queries" if party.may_start else ""
        print(f"  {party.name} at {party.address}: {args.folder / party.name}/ (key and certificate){starts}")
    print(f"keep {args.folder / CA_KEY_FILE} (the CA's private key) away from the party hosts")
    return 0
