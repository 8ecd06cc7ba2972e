"""Packed-document attention's dispatch on CPU: the reference is the block-causal mask, and the
CUDA path's own work (the documents' offsets, the token layout, the two signatures of PyTorch's
varlen_attn) is checked here with a stand-in for the flash kernel that runs each sequence through
causal SDPA. The kernel itself runs in tests/kernels/test_gpu.py."""
import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import assert_close, grads, leaves

from strata.kernels import ops
from strata.kernels.attention import varlen
from strata.kernels.attention.reference import document_attention_ref, document_mask

LENGTHS = ([1, 5, 1, 9, 4], [3, 17], [20])


def packed_seq_idx(lengths=LENGTHS) -> torch.Tensor:
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths])


def sequences_through_sdpa(q, k, v, cu_q, cu_k, max_q, max_k, **causal):
    """What the flash kernel computes, on (t, h, d): each [cu[i], cu[i+1]) its own causal sequence."""
    assert causal in ({"is_causal": True}, {"window_size": (-1, 0)}), causal
    assert cu_q is cu_k and cu_q.dtype == torch.int32 and max_q == max_k
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max())
    out = []
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        part = [t[a:b].transpose(0, 1) for t in (q, k, v)]
        out.append(F.scaled_dot_product_attention(*part, is_causal=True).transpose(0, 1))
    return torch.cat(out)


def old_signature(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False):
    return sequences_through_sdpa(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=is_causal)


def new_signature(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1)):
    return sequences_through_sdpa(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size=window_size)


def test_document_mask_is_block_causal():
    mask = document_mask(torch.tensor([[0, 0, 1, 1, 1, 2]]))[0, 0].int()
    assert mask.tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0],
                             [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]]


def test_reference_equals_each_document_alone():
    seq_idx = packed_seq_idx()
    q, k, v = (torch.randn(3, 2, 20, 8, dtype=torch.float64) for _ in range(3))
    out = document_attention_ref(q, k, v, seq_idx)
    for row, lengths in enumerate(LENGTHS):
        at = 0
        for n in lengths:
            alone = F.scaled_dot_product_attention(*(t[row:row + 1, :, at:at + n] for t in (q, k, v)), is_causal=True)
            torch.testing.assert_close(out[row:row + 1, :, at:at + n], alone, rtol=0, atol=1e-12)
            at += n


def test_document_spans_cross_rows_and_are_kept_per_tensor():
    seq_idx = packed_seq_idx()
    cu, longest = varlen.document_spans(seq_idx)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 1, 6, 7, 16, 20, 23, 40, 60] and longest == 20
    assert varlen.document_spans(seq_idx)[0] is cu  # once per forward: every block shares seq_idx
    one_row = packed_seq_idx(([4, 16], [20], [20]))  # row ends split documents of equal index
    assert varlen.document_spans(one_row)[0].tolist() == [0, 4, 20, 40, 60]
    one_row[0, :4] = 1  # changed in place: read again
    assert varlen.document_spans(one_row)[0].tolist() == [0, 20, 40, 60]


@pytest.mark.parametrize("signature", [old_signature, new_signature], ids=["is_causal", "window_size"])
def test_varlen_layout_equals_the_reference(monkeypatch, signature):
    """The (b, h, l, d) <-> (b * l, h, d) layout and the offsets give the reference's values and
    gradients, through either signature of varlen_attn."""
    monkeypatch.setattr(varlen, "varlen_attn_function", lambda: signature)
    seq_idx = packed_seq_idx()
    raw = [torch.randn(3, 2, 20, 8) for _ in range(3)]
    got, want = leaves(*raw, dtype=torch.float64), leaves(*raw, dtype=torch.float64)
    out = varlen.document_attention_varlen(*got, seq_idx)
    ref = document_attention_ref(*want, seq_idx)
    assert_close("out", out, ref, 1e-12)
    for name, a, b in zip("qkv", grads(out, got), grads(ref, want)):
        assert_close(f"d{name}", a, b, 1e-12)


def test_cpu_and_cached_calls_take_the_mask(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the varlen kernel was called off CUDA")
    monkeypatch.setattr(varlen, "document_attention_varlen", fail)
    seq_idx = packed_seq_idx()
    q = torch.randn(3, 2, 20, 8)
    torch.testing.assert_close(ops.document_attention(q, q, q, seq_idx), document_attention_ref(q, q, q, seq_idx))
    assert not varlen.varlen_supported(q.bfloat16())
