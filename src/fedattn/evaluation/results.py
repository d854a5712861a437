"""Evaluation results on disk: one JSONL line per finished item, a summary JSON, resumable.

A run directory holds ``config.json`` (what produced the records), ``records.jsonl`` (appended
and flushed item by item, so an interruption loses at most the item in flight) and
``summary.json``. Reopening a directory with the same configuration skips finished items; a
different configuration is refused rather than mixed in.

One writer at a time: a store holds an exclusive lock (``flock`` on ``.lock`` in the folder) from
opening to ``close``, because two runs on one folder would each write every record and leave a
summary over twice the items. A folder that is not what a store writes is refused with the file
and line at fault, except the one thing an interruption leaves: a last line without its newline,
which is dropped (and reported) so that its item runs again.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path
from typing import Any

from fedattn.errors import FedAttnError

LOCK_FILE = ".lock"


def read_config(directory: Path) -> dict | None:
    """The folder's ``config.json``, None when there is none; a clear error when it is not a JSON object."""
    path = directory / "config.json"
    if not path.exists():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FedAttnError(f"{path} is not readable JSON ({error}); fix or remove the folder") from None
    if not isinstance(config, dict):
        raise FedAttnError(f"{path} is not a JSON object; fix or remove the folder")
    return config


def summary_paths(root: Path) -> list[Path]:
    """``root``'s summary, or else those of the result folders at any depth below it."""
    own = root / "summary.json"
    return [own] if own.is_file() else sorted(root.rglob("summary.json"))


class ResultStore:
    """A results folder opened for writing (use it as a context manager, or call ``close``)."""

    def __init__(self, directory: Path, config: dict) -> None:
        self.directory = directory
        self.config = config
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise FedAttnError(f"cannot create the results folder {directory}: {error.strerror}") from None
        self.records_path = directory / "records.jsonl"
        self.summary_path = directory / "summary.json"
        self._lock = _exclusive_lock(directory)
        try:
            self._claim(config)
            self._records = self._read_records()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the folder to the next writer."""
        if not self._lock.closed:
            self._lock.close()  # closing the descriptor releases the flock

    def records(self) -> list[dict]:
        """Every finished record, in the order written."""
        return list(self._records)

    def done_keys(self) -> set[str]:
        return {record["key"] for record in self._records}

    def append(self, record: dict) -> None:
        """Write one finished item durably (``record['key']`` identifies it for resuming)."""
        if "key" not in record:
            raise ValueError("a record needs a 'key'")
        if record["key"] in self.done_keys():
            raise ValueError(f"a record for key {record['key']!r} is already in {self.records_path}")
        with self.records_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._records.append(json.loads(json.dumps(record)))  # as a reader would get it back

    def write_summary(self, summary: dict) -> Path:
        temporary = self.summary_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(summary | {"config": self.config}, indent=2, sort_keys=True))
        temporary.replace(self.summary_path)
        return self.summary_path

    def _claim(self, config: dict) -> None:
        """Record the configuration, or check that the folder's is the same."""
        previous = read_config(self.directory)
        if previous is None:
            (self.directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
            return
        current = json.loads(json.dumps(config))  # as it would be stored: tuples become lists
        if previous != current:
            raise FedAttnError(
                f"{self.directory} holds results of another configuration "
                f"(differs in {', '.join(differences(previous, current))}); choose another --out"
            )

    def _read_records(self) -> list[dict]:
        """The records on disk; a torn last line is cut off (with a warning), anything else wrong is an error."""
        if not self.records_path.exists():
            return []
        data = self.records_path.read_bytes()
        lines = data.split(b"\n")
        complete, torn = lines[:-1], lines[-1]  # after the last newline: b"" unless a write was interrupted
        records: list[dict] = []
        keys: set[str] = set()
        for number, line in enumerate(complete, start=1):
            record = _record(line)
            if record is None:
                raise FedAttnError(f"{self.records_path}:{number}: not a record (a JSON object with a 'key')")
            if record["key"] in keys:
                raise FedAttnError(f"{self.records_path}:{number}: a second record for key {record['key']!r}")
            keys.add(record["key"])
            records.append(record)
        if torn:
            print(
                f"fedattn: warning: {self.records_path}:{len(complete) + 1}: dropped a half-written record "
                "(an interrupted run); its item runs again",
                file=sys.stderr,
            )
            with self.records_path.open("r+b") as handle:
                handle.truncate(len(data) - len(torn))
        return records


def differences(previous: dict, current: dict, prefix: str = "") -> list[str]:
    """The settings two configurations disagree on, as dotted paths into nested sections."""
    found = []
    for key in sorted(set(previous) | set(current)):
        old, new = previous.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found += differences(old, new, f"{prefix}{key}.")
        elif old != new:
            found.append(prefix + key)
    return found


def _record(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("key"), str) else None


def _exclusive_lock(directory: Path):
    """The open lock file, locked; a second writer is refused at once rather than queued."""
    handle = (directory / LOCK_FILE).open("a")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise FedAttnError(f"{directory} is in use by another run (one writer at a time)") from None
    return handle


class RecordList:
    """The store's interface without a folder: records kept in memory (a run asked to keep none)."""

    def __init__(self) -> None:
        self._records: list[dict] = []

    def __enter__(self) -> RecordList:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def records(self) -> list[dict]:
        return list(self._records)

    def done_keys(self) -> set[str]:
        return {record["key"] for record in self._records}

    def append(self, record: dict) -> None:
        self._records.append(record)
