import pytest
import torch

from fedattn.runtime.tiny_model import build_tiny_model


@pytest.fixture
def one_torch_thread():
    """Tiny matrices: extra threads only contend (milliseconds per op on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of tiny-random: 8 blocks, 4 heads, 2 KV heads, byte-level vocabulary."""
    torch.set_num_threads(1)
    return build_tiny_model()


def random_segments(lengths: list[int], seed: int, vocab: int = 256) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=generator).tolist() for length in lengths]
