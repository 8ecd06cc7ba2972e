"""model/memory.py's tensor lists for the Triton path equal what the Triton kernels keep for the
backward, byte for byte (fp32 under the interpreter; bf16 changes dtypes, not the tensors)."""
import pytest
import torch

from strata.model.memory import _cross_entropy_chunk
from tests.model.test_memory import CONFIGS, check_blocks, loss_kept_and_listed


@pytest.mark.parametrize("name, mode", [("gqa-rope-swiglu", "none"), ("gqa-rope-swiglu", "selective"),
                                        ("mha-relu2", "none")])
def test_block_activations_are_what_the_triton_forward_keeps(name, mode, monkeypatch):
    monkeypatch.setenv("STRATA_KERNELS", "triton")
    torch.manual_seed(0)
    check_blocks(CONFIGS[name](), "triton", 2, 40, mode)


def test_loss_activations_are_what_the_triton_loss_keeps(monkeypatch):
    monkeypatch.setenv("STRATA_KERNELS", "triton")
    from strata.kernels.cross_entropy.kernel import _default_chunk

    kept, listed = loss_kept_and_listed("triton")
    assert kept == listed
    for n, vocab, dim in ((120, 96, 48), (4096, 32768, 2048), (8192, 131072, 4096), (5, 7, 3)):
        assert _cross_entropy_chunk(n, vocab, dim) == _default_chunk(n, vocab, dim)
