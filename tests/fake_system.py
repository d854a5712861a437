"""A second system for the harness's tests: it plugs in through the contract alone (no FedAttn).

It "answers" from what the item gives it: with ``--oracle`` the first reference (so every score is
1), else the question's first word; one party per document plus the asker, each "sending" the
bytes of its own text, which is also what its cost model expects.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from fedattn.report.schema import PartyReport, RunReport
from fedattn.systems.base import Description


@dataclass
class EchoSetup:
    oracle: bool
    device: str = "nowhere"


class EchoSystem:
    name = "echo"
    description = "answers from the item itself (tests only)"

    def __init__(self) -> None:
        self.batches: list[list[str]] = []  # the keys of every batch it was asked to answer

    def add_options(self, parser: argparse.ArgumentParser, task) -> None:
        parser.add_argument("--oracle", action="store_true")

    def configure(self, args: argparse.Namespace) -> EchoSetup:
        return EchoSetup(args.oracle)

    def check(self, setup: EchoSetup, item) -> None:
        pass

    def answer_many(self, setup: EchoSetup, items: list) -> list[RunReport]:
        self.batches.append([item.key for item in items])
        return [self._report(setup, item) for item in items]

    def _report(self, setup: EchoSetup, item) -> RunReport:
        answer = item.references[0] if setup.oracle else item.question.split()[0]
        texts = [*item.documents, item.question]
        parties = [
            PartyReport(
                f"holder-{rank}" if rank < len(item.documents) else "asker",
                rank,
                "holder" if rank < len(item.documents) else "asker",
                bytes_sent=len(text.encode()),
                expected_bytes_sent=len(text.encode()),
                answer=answer if rank == len(item.documents) else None,
                answer_token_ids=[7, 7] if rank == len(item.documents) else None,
            )
            for rank, text in enumerate(texts)
        ]
        sent = sum(len(text.encode()) for text in texts)
        return RunReport(
            system=self.name,
            transport="inprocess",
            model={"name": "none"},
            config={"oracle": setup.oracle},
            answer=answer,
            answer_token_ids=[7, 7],
            parties=parties,
            expected_bytes={"sent": sent},
            timing={"wall_s": 0.5, "decode_s": 0.25},
        )

    def run_rank(self, setup, rendezvous, text, question, publisher_context) -> RunReport:
        raise NotImplementedError("echo answers in-process only")

    def config_json(self, setup: EchoSetup) -> dict:
        return {"oracle": setup.oracle}

    def describe(self, config: dict, task_settings: dict) -> Description:
        settings = task_settings | {"oracle": config["oracle"]}
        return Description(settings, "oracle" if config["oracle"] else "first word")


SYSTEM = EchoSystem()
