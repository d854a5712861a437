"""Model runtime: verification of assembled GGUFs, name resolution, caches and identities.

No real model is needed: fake chunk packages are written to a temp dir and put on sys.path, and
the tiny random model stands in wherever weights are loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from fedattn.errors import FedAttnError
from fedattn.runtime import models
from fedattn.runtime.models import KNOWN_MODELS, TINY_RANDOM, ModelPart, ModelSpec, load_model
from fedattn.runtime.tiny_model import TINY_MODELS, build_tiny_model


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep every test away from the real cache."""
    root = tmp_path / "fedattn-home"
    monkeypatch.setenv("FEDATTN_HOME", str(root))
    return root


def fake_spec(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunks: list[bytes], sha256: str | None = None
) -> ModelSpec:
    """A spec whose parts are small files inside fake packages importable from ``tmp_path/site``."""
    site = tmp_path / "site"
    parts = []
    for index, data in enumerate(chunks, start=1):
        module = f"fedattn_fake_chunk_part{index}"
        (site / module / "data").mkdir(parents=True)
        (site / module / "__init__.py").write_text("raise ImportError('must not be imported')\n")
        (site / module / "data" / f"part{index:02d}.bin").write_bytes(data)
        parts.append(ModelPart(module, f"data/part{index:02d}.bin"))
    monkeypatch.syspath_prepend(str(site))
    whole = b"".join(chunks)
    return ModelSpec(
        name="fake-model",
        description="fake",
        requirements=tuple(f"fedattn-fake-chunk-part{i}==1.0" for i in range(1, len(chunks) + 1)),
        parts=tuple(parts),
        gguf_name="fake.gguf",
        sha256=sha256 or hashlib.sha256(whole).hexdigest(),
        size=len(whole),
    )


def test_assembly_concatenates_parts_in_order(tmp_path, monkeypatch):
    spec = fake_spec(tmp_path, monkeypatch, [b"first-", b"second-", b"third"])
    out = models.assemble_gguf(spec, tmp_path / "out.gguf", progress=False)
    assert out.read_bytes() == b"first-second-third"


def test_sha256_mismatch_is_refused_and_the_file_deleted(tmp_path, monkeypatch):
    wrong = "0" * 64
    spec = fake_spec(tmp_path, monkeypatch, [b"abc", b"def"], sha256=wrong)
    actual = hashlib.sha256(b"abcdef").hexdigest()
    destination = tmp_path / "out.gguf"
    with pytest.raises(FedAttnError, match=f"sha256 {actual}, expected {wrong}"):
        models.assemble_gguf(spec, destination, progress=False)
    assert not destination.exists()


def test_size_mismatch_is_refused_before_writing(tmp_path, monkeypatch):
    spec = fake_spec(tmp_path, monkeypatch, [b"abc"])
    spec = dataclasses.replace(spec, size=4)
    destination = tmp_path / "out.gguf"
    with pytest.raises(FedAttnError, match="3 bytes, expected 4"):
        models.assemble_gguf(spec, destination, progress=False)
    assert not destination.exists()


def test_named_model_neither_cached_nor_installed(monkeypatch):
    spec = ModelSpec(
        "ghost", "", ("ghost-part1==1.0",), (ModelPart("fedattn_no_such_module", "x.bin"),), "g.gguf", "0" * 64, 1
    )
    monkeypatch.setitem(KNOWN_MODELS, "ghost", spec)
    with pytest.raises(FedAttnError, match=r"model 'ghost' is not installed: run `fedattn install ghost`"):
        load_model("ghost", progress=False)


def test_unknown_name_lists_known_names():
    with pytest.raises(FedAttnError) as caught:
        load_model("no-such-model", progress=False)
    for name in [*KNOWN_MODELS, TINY_RANDOM]:
        assert name in str(caught.value)


def test_tiny_random_loads_ready_and_with_a_stable_identity():
    first = load_model(TINY_RANDOM, progress=False)
    second = load_model(TINY_RANDOM, dtype=torch.float64, progress=False)
    assert first.identity == second.identity
    assert first.name == TINY_RANDOM
    assert not first.model.training
    assert second.model.dtype == torch.float64
    assert first.model.generation_config.eos_token_id == first.tokenizer.eos_token_id


def save_tiny(directory: Path) -> None:
    model, tokenizer = build_tiny_model()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def tiny_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[1, 2, 3, 4, 5]])).logits


def test_path_to_a_saved_directory_loads_the_same_model(tmp_path):
    save_tiny(tmp_path / "tiny")
    from_path = load_model(str(tmp_path / "tiny"), progress=False)
    reference = load_model(TINY_RANDOM, progress=False)
    assert torch.equal(tiny_logits(from_path.model), tiny_logits(reference.model))
    assert from_path.name == str((tmp_path / "tiny").resolve())
    assert from_path.identity == load_model(str(tmp_path / "tiny"), progress=False).identity
    assert from_path.tokenizer.chat_template == reference.tokenizer.chat_template


def test_unreadable_paths_give_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FedAttnError, match="neither a model directory"):
        load_model(str(tmp_path / "empty"), progress=False)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(FedAttnError, match="cannot load a model from"):
        load_model(str(tmp_path / "junk.gguf"), progress=False)


def test_a_complete_cache_is_loaded_without_the_packages(monkeypatch):
    spec = ModelSpec("cached-only", "", (), (ModelPart("fedattn_no_such_module", "x.bin"),), "c.gguf", "ab" * 32, 1)
    monkeypatch.setitem(KNOWN_MODELS, spec.name, spec)
    directory = models.cache_dir(spec.name)
    save_tiny(directory)
    assert not models.cache_complete(spec), "no marker yet: an unfinished save must not count"
    models._write_marker(directory, spec)
    loaded = load_model(spec.name, progress=False)
    assert loaded.identity == spec.sha256[:16]
    assert torch.equal(tiny_logits(loaded.model), tiny_logits(load_model(TINY_RANDOM, progress=False).model))


def cached_tiny(monkeypatch: pytest.MonkeyPatch) -> tuple[ModelSpec, Path]:
    """tiny-random's weights as the converted cache of a named model, marker and all."""
    spec = ModelSpec("cached-tiny", "", (), (ModelPart("fedattn_no_such_module", "x.bin"),), "c.gguf", "cd" * 32, 1)
    monkeypatch.setitem(KNOWN_MODELS, spec.name, spec)
    directory = models.cache_dir(spec.name)
    save_tiny(directory)
    models._write_marker(directory, spec)
    return spec, directory


def flip_last_bytes(path: Path, count: int = 16) -> None:
    """Corrupt the end of the file (tensor data, not the header: safetensors still parses it)."""
    data = bytearray(path.read_bytes())
    data[-count:] = bytes(byte ^ 0xFF for byte in data[-count:])
    path.write_bytes(bytes(data))


def test_a_cache_corrupted_on_disk_is_refused_at_load_naming_the_rebuild(monkeypatch):
    spec, directory = cached_tiny(monkeypatch)
    good = load_model(spec.name, progress=False)
    flip_last_bytes(directory / "model.safetensors")
    with pytest.raises(FedAttnError) as refused:
        load_model(spec.name, progress=False)
    message = str(refused.value)
    assert message == (
        f"the cache of model 'cached-tiny' in {directory} is corrupt (model.safetensors differs from what was "
        "written); rebuild it: `fedattn install cached-tiny`"
    )
    assert "\n" not in message
    assert good.identity == spec.sha256[:16]


def test_a_corrupted_cache_copied_elsewhere_is_refused_when_loaded_by_path(monkeypatch, tmp_path):
    spec, directory = cached_tiny(monkeypatch)
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    assert load_model(str(copy), progress=False).identity == spec.sha256[:16]
    flip_last_bytes(copy / "model.safetensors")
    with pytest.raises(FedAttnError, match=r"cache of model 'cached-tiny' in .*copy is corrupt \(model.safetensors"):
        load_model(str(copy), progress=False)


def test_a_corrupted_cache_is_one_line_and_exit_2_on_the_command_line(monkeypatch, capsys):
    from fedattn.cli.main import main

    spec, directory = cached_tiny(monkeypatch)
    (directory / "tokenizer_config.json").write_text("{}")  # any file of the cache, not only the weights
    assert main(["run", "--model", spec.name, "--question", "What?", "--context", "Facts."]) == 2
    error = capsys.readouterr().err  # after the progress lines (the hashing bar among them), one line
    assert "Traceback" not in error
    last = error.strip().splitlines()[-1]
    assert last.startswith("fedattn: error: the cache of model 'cached-tiny'"), error
    assert "(tokenizer_config.json differs from what was written)" in last


def test_install_rebuilds_a_corrupt_cache(monkeypatch):
    spec, directory = cached_tiny(monkeypatch)
    rebuilt = []
    monkeypatch.setattr(models, "_pip_install", lambda *args: None)
    monkeypatch.setattr(models, "build_cache", lambda spec, progress: rebuilt.append(spec.name))
    models.install_model(spec.name, progress=False)
    assert rebuilt == []  # intact: nothing to do
    flip_last_bytes(directory / "model.safetensors")
    models.install_model(spec.name, progress=False)
    assert rebuilt == [spec.name]


def test_model_status_lists_every_model(home):
    rows = {row["name"]: row for row in models.model_status()}
    assert set(rows) == {*KNOWN_MODELS, *TINY_MODELS}
    for name in KNOWN_MODELS:
        assert rows[name]["cached"] is False
        assert rows[name]["cache_path"] == str(home / "models" / name)
    assert rows[TINY_RANDOM]["installed"] is True


def test_install_rejects_names_it_cannot_install():
    with pytest.raises(FedAttnError, match="built in"):
        models.install_model(TINY_RANDOM)
    with pytest.raises(FedAttnError, match="installable"):
        models.install_model("no-such-model")


def test_loading_shows_our_progress_not_transformers(tmp_path, capsys):
    """transformers' "Loading weights" bar and warnings are silenced while we load (our own line
    replaces them), and its settings are back afterwards."""
    from transformers.utils import logging as hf_logging

    save_tiny(tmp_path / "tiny")
    hf_logging.set_verbosity_warning()
    hf_logging.enable_progress_bar()
    load_model(str(tmp_path / "tiny"), progress=True)
    printed = capsys.readouterr()
    assert "Loading tiny" in printed.err and "Loading weights" not in printed.err and printed.out == ""
    assert hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == hf_logging.WARNING
    load_model(str(tmp_path / "tiny"), progress=False)
    assert capsys.readouterr().err == ""


def test_pip_output_is_shown_only_when_pip_fails(capfd):
    models._pip_install(("pip",), "pip, already there", progress=False)
    assert capfd.readouterr() == ("", "")
    with pytest.raises(FedAttnError, match="pip exited with .* its output is above"):
        models._pip_install(("not a requirement!",), "a bad requirement", progress=False)
    assert "Invalid requirement" in capfd.readouterr().err
