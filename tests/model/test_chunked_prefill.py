"""Chunked prefill: a prompt fed through the caches in pieces (of 1, 7 or 100 tokens, across SSD
chunk boundaries) gives the hidden states, the caches and the next logits of one whole prefill,
for every block kind (float64, 1e-10). The Mamba2 blocks clamp dt (model.mamba.dt_limit) at both
ends, so the one-token path (the recurrence) and the chunked scan are held to the same clamp."""
import pytest
import torch

from strata.model.config import AttentionConfig, MambaConfig, MLPConfig, ModelConfig
from strata.model.generate import Sampling, generate, last_logits, prefill
from strata.model.hybrid import HybridLM

CHUNK = 16
LENGTH = 130
PATTERNS = {"mamba2": "MM", "attention": "**", "mlp": "--", "hybrid": "M*-M-*"}


def model_of(pattern: str) -> HybridLM:
    torch.manual_seed(0)
    cfg = ModelConfig(pattern=pattern, d_model=32, vocab_size=101, max_seq_len=512, tie_embeddings=False,
                      mamba=MambaConfig(d_state=16, headdim=16, ngroups=2, chunk_size=CHUNK, dt_limit=[0.004, 0.025]),
                      attention=AttentionConfig(n_heads=4, n_kv_heads=2), mlp=MLPConfig(d_ff=64))
    model = HybridLM(cfg).double().eval()
    with torch.no_grad():  # larger weights: states and attention far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


def cache_tensors(caches) -> list[torch.Tensor]:
    out = []
    for c in caches:
        if c is None:
            continue
        if hasattr(c, "ssm_state"):
            out += [c.ssm_state, c.conv_state]
        else:
            out += [c.k[:, :, :c.length], c.v[:, :, :c.length]]
    return out


@pytest.mark.parametrize("piece", [1, 7, 100])
@pytest.mark.parametrize("kind", list(PATTERNS))
def test_prefill_in_pieces_equals_one_prefill(kind, piece):
    model = model_of(PATTERNS[kind])
    ids = torch.randint(0, 101, (2, LENGTH), generator=torch.Generator().manual_seed(1))
    nxt = torch.randint(0, 101, (2, 1), generator=torch.Generator().manual_seed(2))
    whole_caches = model.allocate_caches(2, LENGTH + 1, dtype=torch.float64)
    piece_caches = model.allocate_caches(2, LENGTH + 1, dtype=torch.float64)
    with torch.no_grad():
        whole = model.hidden_states(ids, caches=whole_caches)
        pieces = torch.cat([model.hidden_states(p, caches=piece_caches) for p in ids.split(piece, dim=1)], dim=1)
        torch.testing.assert_close(whole, model.hidden_states(ids), rtol=0, atol=1e-10)  # the training path
        torch.testing.assert_close(pieces, whole, rtol=0, atol=1e-10)
        for got, want in zip(cache_tensors(piece_caches), cache_tensors(whole_caches), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        torch.testing.assert_close(last_logits(model, nxt, piece_caches), last_logits(model, nxt, whole_caches),
                                   rtol=0, atol=1e-10)


def test_the_dt_limit_bites_on_both_ends():
    model = model_of("M")
    mixer = model.blocks[0].mixer
    ids = torch.randint(0, 101, (2, LENGTH), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dt = mixer.split_projection(mixer.in_proj(model.blocks[0].norm(model.embed(ids))))[2]
        dt = torch.nn.functional.softplus(dt + mixer.dt_bias)
    low, high = model.cfg.mamba.dt_limit
    assert (dt < low).float().mean() > 0.05 and (dt > high).float().mean() > 0.05


@pytest.mark.parametrize("prefill_chunk", [1, 7, 100])
def test_generate_prefills_in_chunks_with_the_logits_of_one_prefill(prefill_chunk):
    model = model_of(PATTERNS["hybrid"])
    prompt = torch.randint(0, 101, (2, 120), generator=torch.Generator().manual_seed(3))
    sampling = Sampling(max_new_tokens=6)
    whole = generate(model, prompt, sampling, keep_logits=True, prefill_chunk=10**6)
    chunked = generate(model, prompt, sampling, keep_logits=True, prefill_chunk=prefill_chunk)
    assert torch.equal(chunked.tokens, whole.tokens)
    for got, want in zip(chunked.step_logits, whole.step_logits, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_a_prefill_chunk_below_one_is_refused():
    model = model_of("M")
    with pytest.raises(ValueError, match="prefill_chunk"):
        generate(model, [1, 2, 3], Sampling(max_new_tokens=2), prefill_chunk=0)
    with pytest.raises(ValueError, match="prefill_chunk"):
        prefill(model, torch.tensor([[1, 2]]), model.allocate_caches(1, 2), chunk=0)


def test_generate_cli_refuses_a_prefill_chunk_below_one_in_one_line(capsys):
    from strata.launcher import generate as generate_cli

    assert generate_cli.main(["--checkpoint", "nowhere", "--prompt", "x", "--prefill-chunk", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --prefill-chunk: must be >= 1, got 0"
