"""Cached (incremental) generation equals recomputing the full forward at every step, across
several SSD chunk boundaries; sampling filters keep exactly the tokens they should."""
import dataclasses

import pytest
import torch

from strata.model.config import AttentionConfig, MambaConfig, MLPConfig, ModelConfig
from strata.model.generate import PromptTooLong, Sampling, filter_logits, generate
from strata.model.hybrid import HybridLM

CHUNK = 8


def tiny_model(pattern="M-*-M*-", rope=True, seed=0, max_seq_len=96, rope_fraction=1.0) -> HybridLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(pattern=pattern, d_model=64, vocab_size=101, max_seq_len=max_seq_len, tie_embeddings=False,
                      mamba=MambaConfig(d_state=16, headdim=16, ngroups=2, chunk_size=CHUNK),
                      attention=AttentionConfig(n_heads=4, n_kv_heads=2, rope=rope, rope_fraction=rope_fraction),
                      mlp=MLPConfig(d_ff=96))
    model = HybridLM(cfg).eval()
    with torch.no_grad():  # larger weights: states and attention far from uniform
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model


@pytest.mark.parametrize("prompt_len,rope,temperature,rope_fraction",
                         [(13, True, 0.0, 1.0), (5, False, 0.0, 1.0), (1, True, 0.9, 1.0), (9, True, 0.0, 0.25)])
def test_cached_generation_equals_full_recompute_every_step(prompt_len, rope, temperature, rope_fraction):
    model = tiny_model(rope=rope, rope_fraction=rope_fraction)  # 0.25: RoPE on 4 of each head's 16 channels
    prompt = torch.randint(0, 101, (2, prompt_len), generator=torch.Generator().manual_seed(3))
    new = 4 * CHUNK + 3  # the sequence crosses several chunk boundaries during decoding
    out = generate(model, prompt, Sampling(max_new_tokens=new, temperature=temperature, top_k=20, seed=1),
                   keep_logits=True)
    assert out.tokens.shape == (2, prompt_len + new) and len(out.step_logits) == new
    with torch.no_grad():
        for step, cached in enumerate(out.step_logits):
            full = model(out.tokens[:, :prompt_len + step])[:, -1]
            assert (full - cached).abs().max().item() <= 1e-5, f"step {step}"
    if temperature == 0:
        assert torch.equal(out.new_tokens[:, 0], out.step_logits[0].argmax(-1))


def test_sampling_is_reproducible_by_seed_and_differs_across_seeds():
    model = tiny_model()
    prompt = [5, 17, 42]
    draws = [generate(model, prompt, Sampling(max_new_tokens=12, temperature=1.5, seed=s)).tokens for s in (7, 7, 8)]
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])


def test_generation_stops_at_eos_and_pads_finished_sequences():
    model = tiny_model()
    prompt = torch.tensor([[1, 2, 3], [9, 8, 7]])
    greedy = generate(model, prompt, Sampling(max_new_tokens=20)).new_tokens
    eos = int(greedy[0, 2])  # the third greedy token of sequence 0 plays EOS
    alone = generate(model, prompt[:1], Sampling(max_new_tokens=20, eos_id=eos))
    stop = greedy[0].tolist().index(eos) + 1
    assert alone.stopped == "eos" and alone.new_tokens[0].tolist() == greedy[0, :stop].tolist()
    both = generate(model, prompt, Sampling(max_new_tokens=20, eos_id=eos)).new_tokens
    assert all(t == eos for t in both[0, stop - 1:].tolist())  # finished: padded with EOS
    other = greedy[1].tolist()
    until = other.index(eos) + 1 if eos in other else len(other)
    assert both[1, :until].tolist() == other[:until]  # the other sequence is unaffected


def test_generation_stops_at_max_seq_len():
    model = tiny_model(max_seq_len=24)
    out = generate(model, list(range(20)), Sampling(max_new_tokens=50))
    assert out.tokens.shape[1] == 24 and out.stopped == "max_seq_len"


def test_a_prompt_longer_than_the_model_limit_is_one_clear_error():
    model = tiny_model(max_seq_len=24)
    with pytest.raises(PromptTooLong) as e:
        generate(model, list(range(25)), Sampling(max_new_tokens=5))
    assert "\n" not in str(e.value) and "25 tokens" in str(e.value) and "max_seq_len=24" in str(e.value)


def test_top_k_and_top_p_keep_exactly_the_expected_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.2, 0.15, 0.1]]))
    kept = lambda t: torch.isfinite(t)[0].tolist()
    assert kept(filter_logits(logits, top_k=2)) == [True, False, True, False, False]
    # nucleus 0.8: 0.5 + 0.2 = 0.7 < 0.8, so 0.15 joins; 0.85 >= 0.8 stops there
    assert kept(filter_logits(logits, top_p=0.8)) == [True, False, True, True, False]
    assert kept(filter_logits(logits, top_p=0.5)) == [True, False, False, False, False]
    assert kept(filter_logits(logits, top_k=3, top_p=0.6)) == [True, False, True, False, False]


@pytest.mark.parametrize("field,value", [
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", float("nan")), ("top_p", -0.5),
    ("temperature", -1.0), ("temperature", float("nan")), ("temperature", float("inf")),
    ("top_k", -1), ("max_new_tokens", 0), ("max_new_tokens", -3)])
def test_bad_sampling_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=f"^{field}: ") as err:
        Sampling(**{field: value}).validate()
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=f"^{field}: "):  # generate refuses before reading the model
        generate(tiny_model(), [1, 2], Sampling(**{field: value}))


def test_a_tiny_temperature_samples_the_most_likely_token():
    model = tiny_model()
    greedy = generate(model, [5, 17, 42], Sampling(max_new_tokens=6)).tokens
    for temperature in (1e-30, 5e-324):  # logits / temperature overflows float32 (and float64 for the second)
        assert torch.equal(generate(model, [5, 17, 42], Sampling(max_new_tokens=6, temperature=temperature)).tokens,
                           greedy)


def padded_vocab_model(allowed: int) -> HybridLM:
    """A model whose vocabulary is padded past `allowed` ids, its head arranged so that a padded id
    has the largest logit at every position: rows +-100 e_i for each hidden dimension i (one of
    each pair is 100 |h_i| >= 0), the real ids' rows scaled down to a thousandth."""
    d_model = 64
    model = tiny_model()
    cfg = model.cfg
    padded = HybridLM(dataclasses.replace(cfg, vocab_size=allowed + 2 * d_model)).eval()
    state = model.state_dict()
    with torch.no_grad():
        for name, p in padded.named_parameters():
            if name in ("embed.weight", "lm_head.weight"):
                p.zero_()
                p[:allowed] = state[name][:allowed] * (1e-3 if name == "lm_head.weight" else 1.0)
            else:
                p.copy_(state[name])
        eye = torch.eye(d_model)
        padded.lm_head.weight[allowed:] = 100 * torch.cat([eye, -eye])
    return padded


def test_ids_past_the_tokenizers_vocabulary_are_never_produced():
    allowed = 101
    model = padded_vocab_model(allowed)
    prompt = torch.tensor([[5, 17, 42], [9, 8, 7]])
    unmasked = generate(model, prompt, Sampling(max_new_tokens=10)).new_tokens
    assert (unmasked >= allowed).all()  # the arrangement works: without the mask every token is padded
    for sampling in (Sampling(max_new_tokens=10), Sampling(max_new_tokens=10, temperature=1.0, seed=3),
                     Sampling(max_new_tokens=10, temperature=1e6, top_k=5, top_p=0.99, seed=4)):
        out = generate(model, prompt, sampling, keep_logits=True, allowed_vocab=allowed)
        assert (out.new_tokens < allowed).all(), sampling
        if sampling.temperature == 0:  # greedy: the best of the allowed ids
            assert torch.equal(out.new_tokens[:, 0], out.step_logits[0][:, :allowed].argmax(-1))
