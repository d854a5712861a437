"""FedAttn through the system contract: its networked rank (``run_rank``) gives the answer of its
in-process runner (``answer_many``), and a stored configuration reads back as settings."""

import argparse
import json
import socket
import subprocess
import sys

import pytest

from fedattn.evaluation.tasks.base import Item, Task
from fedattn.systems import get_system
from fedattn.systems.fedattn.config import add_options

CONTEXT, QUESTION = "The vault code is 4417.", "What is the vault code?"
WORDS = ["--model", "tiny-random", "--device", "cpu", "--max-new-tokens", "5", "--sync-every", "2"]
RANK = """
import json, sys, argparse
from fedattn.systems import get_system
from fedattn.systems.fedattn.config import add_options
from fedattn.network.meeting import Rendezvous
rank, port = int(sys.argv[1]), int(sys.argv[2])
parser = argparse.ArgumentParser()
add_options(parser)
system = get_system("fedattn")
setup = system.configure(parser.parse_args(sys.argv[3:-2]))
text, question = (sys.argv[-2], None) if rank == 0 else (None, sys.argv[-1])
report = system.run_rank(setup, Rendezvous("127.0.0.1", port, rank, 2, rank == 0, 60.0), text, question, None)
print(json.dumps(getattr(report, "to_json", lambda: report)()))
"""


class Documents(Task):
    name, description, documents, max_new_tokens, batch_size = "docs", "", True, 5, 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_networked_rank_answers_as_the_in_process_runner(one_torch_thread):
    system = get_system("fedattn")
    parser = argparse.ArgumentParser()
    system.add_options(parser, Documents())
    setup = system.configure(parser.parse_args(WORDS))
    (inprocess,) = system.answer_many(setup, [Item("0", QUESTION, documents=(CONTEXT,))])
    port = free_port()
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK, str(rank), str(port), *WORDS, "--json", CONTEXT, QUESTION],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], [err[-2000:] for _, err in outputs]
    publisher = json.loads(outputs[1][0])
    assert publisher["answer_token_ids"] == inprocess.answer_token_ids


def test_a_stored_configuration_reads_back_as_the_options_that_made_it():
    parser = argparse.ArgumentParser()
    add_options(parser)
    system = get_system("fedattn")
    setup = system.configure(
        parser.parse_args(
            [
                "--model",
                "tiny-random",
                "--device",
                "cpu",
                "--kv-noise",
                "0.5",
                "--publisher-layers",
                "6-7",
                "--sync-every",
                "4",
                "--kv-codec",
                "int8",
            ]
        )
    )
    setup.mode = "federated"
    described = system.describe(json.loads(json.dumps(system.config_json(setup))), {"parties": 3})
    assert {key: described.settings[key] for key in ("sync_every", "publisher_layers", "kv_codec", "kv_noise")} == {
        "sync_every": 4,
        "publisher_layers": "6-7",
        "kv_codec": "int8",
        "kv_noise": 0.5,
    }
    assert described.label == "parties=3 sync_every=4 publisher_layers=6-7 kv_codec=int8 kv_noise=0.5"
    assert described.exposure.blocks == (0, 4, 6, 7) and described.exposure.noise == 0.5
    setup.mode = "alone"
    alone = system.describe(json.loads(json.dumps(system.config_json(setup))), {"parties": 3})
    assert (alone.reference, alone.exposure, alone.label) == (True, None, "alone")
    assert "kv_codec" not in alone.settings


@pytest.mark.parametrize("mode", ["federated", "centralized", "alone"])
def test_every_mode_holds_the_same_question(mode):
    from fedattn.systems.fedattn.system import VIEWS

    view = VIEWS[mode](Item("0", QUESTION, documents=(CONTEXT, "other")))
    assert view.question == QUESTION
    assert (view.contexts, view.publisher_context) == {
        "federated": ((CONTEXT, "other"), None),
        "centralized": ((), f"{CONTEXT}\n\nother"),
        "alone": ((), None),
    }[mode]
