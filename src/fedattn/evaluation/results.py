"""Evaluation results on disk: one JSONL line per finished item, a summary JSON, resumable.

A run directory holds ``config.json`` (what produced the records), ``records.jsonl`` (appended
and flushed item by item, so an interruption loses at most the item in flight) and
``summary.json``. Reopening a directory with the same configuration skips finished items; a
different configuration is refused rather than mixed in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fedattn.errors import FedAttnError


class ResultStore:
    def __init__(self, directory: Path, config: dict) -> None:
        self.directory = directory
        self.config = config
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise FedAttnError(f"cannot create the results folder {directory}: {error.strerror}") from None
        self.records_path = directory / "records.jsonl"
        self.summary_path = directory / "summary.json"
        config_path = directory / "config.json"
        if config_path.exists():
            previous = json.loads(config_path.read_text())
            current = json.loads(json.dumps(config))  # as it would be stored: tuples become lists
            if previous != current:
                differing = sorted(key for key in set(previous) | set(current) if previous.get(key) != current.get(key))
                raise FedAttnError(
                    f"{directory} holds results of another configuration (differs in {', '.join(differing)}); "
                    "choose another --out"
                )
        else:
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True))

    def records(self) -> list[dict]:
        """Finished records; a half-written last line (an interrupted run) is dropped."""
        if not self.records_path.exists():
            return []
        records = []
        for line in self.records_path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def done_keys(self) -> set[str]:
        return {record["key"] for record in self.records()}

    def append(self, record: dict) -> None:
        """Write one finished item durably (``record['key']`` identifies it for resuming)."""
        if "key" not in record:
            raise ValueError("a record needs a 'key'")
        self._drop_partial_line()
        with self.records_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def write_summary(self, summary: dict) -> Path:
        temporary = self.summary_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(summary | {"config": self.config}, indent=2, sort_keys=True))
        temporary.replace(self.summary_path)
        return self.summary_path

    def _drop_partial_line(self) -> None:
        if not self.records_path.exists():
            return
        data = self.records_path.read_bytes()
        if data and not data.endswith(b"\n"):
            self.records_path.write_bytes(data[: data.rfind(b"\n") + 1])
