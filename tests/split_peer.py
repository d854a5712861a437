"""A FedSEA service in its own process, for tests in which one must die (``FEDATTN_INJECT_FAULT``).

    python split_peer.py ROSTER NAME serve
    python split_peer.py ROSTER NAME ask SERVER PROMPT OPTION_WORDS...

``serve``: ``NAME``'s service of tiny-random (as ``fedattn serve --system split`` makes it) until
killed. ``ask``: the same service, then one query of it, the asker as the client and ``SERVER``
as the server; it prints ``answered`` or the error.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from fedattn.errors import FedAttnError
from fedattn.network.federation import load_roster
from fedattn.network.service import Service, ask
from fedattn.systems.fedsea.service import handler_from_args


def main(words: list[str]) -> None:
    roster_path, name, action, *rest = words
    roster = load_roster(Path(roster_path))
    args = argparse.Namespace(model="tiny-random", device="cpu", dtype="float32", max_client_blocks=5)
    service = Service(roster, name, roster.credentials(name), handler_from_args(args, None))
    print("serving", flush=True)
    if action == "serve":
        threading.Event().wait()
    server, prompt, *options = rest
    try:
        ask(roster, name, roster.credentials(name), [server, name], options, {"prompt": prompt})
        print("answered", flush=True)
    except FedAttnError as error:
        print(f"error: {error}", flush=True)
    service.close()


if __name__ == "__main__":
    main(sys.argv[1:])
