"""model/memory.py's tensor lists for the Triton path equal what the Triton kernels keep for the
backward, byte for byte (fp32 under the interpreter; bf16 changes dtypes, not the tensors)."""
import pytest
import torch

from kernels import ops
from model.hybrid import HybridLM
from model.memory import Shape, _cross_entropy_chunk, loss_activations
from tests.model.test_memory import CONFIGS, check_blocks, gqa_rope, saved_bytes


@pytest.mark.parametrize("name, mode", [("gqa-rope-swiglu", "none"), ("gqa-rope-swiglu", "selective"),
                                        ("mha-relu2", "none")])
def test_block_activations_are_what_the_triton_forward_keeps(name, mode, monkeypatch):
    monkeypatch.setenv("STRATA_KERNELS", "triton")
    torch.manual_seed(0)
    check_blocks(CONFIGS[name](), "triton", 2, 40, mode)


def test_loss_activations_are_what_the_triton_loss_keeps(monkeypatch):
    monkeypatch.setenv("STRATA_KERNELS", "triton")
    from kernels.cross_entropy.kernel import _default_chunk

    cfg = gqa_rope()
    model = HybridLM(cfg)
    x = torch.randn(3, 40, cfg.d_model, requires_grad=True)
    labels = torch.randint(0, cfg.vocab_size, (3 * 40,))

    def loss(x):
        h = model.final_norm(x)
        return ops.linear_cross_entropy(h.reshape(-1, cfg.d_model), model.head_weight, labels)

    expected = sum(t.bytes for t in loss_activations(cfg, Shape(3, 40, kernels="triton", act_bytes=4)).saved)
    assert saved_bytes(loss, list(model.parameters()), x) == expected
    for n, vocab, dim in ((120, 96, 48), (4096, 32768, 2048), (8192, 131072, 4096), (5, 7, 3)):
        assert _cross_entropy_chunk(n, vocab, dim) == _default_chunk(n, vocab, dim)
