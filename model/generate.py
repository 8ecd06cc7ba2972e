"""Text generation with incremental decoding on HybridLM's caches.

    out = generate(model, prompt_ids, Sampling(max_new_tokens=64, temperature=0.8, top_p=0.95, eos_id=3))
    out.tokens  # (batch, prompt + generated)

The prompt goes through the chunked path (filling each Mamba2 block's conv and SSM states
and each attention block's KV cache), in pieces of at most `prefill_chunk` tokens, each
continuing from the caches the previous one left (chunked prefill: the same logits as one
piece, with activations bounded by the piece); every new token then takes one step of the
recurrence. Greedy when temperature is 0; otherwise temperature, then top-k, then top-p
(nucleus) filtering, then a draw from a seeded generator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


DEFAULT_PREFILL_CHUNK = 2048
"""Prompt tokens per forward of chunked prefill (a multiple of every usual SSD chunk size)."""


class PromptTooLong(ValueError):
    """The prompt does not fit the model's max_seq_len; str() is one line."""


@dataclass
class Sampling:
    max_new_tokens: int = 128
    """Tokens to generate at most (fewer at EOS or at the model's max_seq_len)."""
    temperature: float = 0.0
    """0 is greedy (argmax); otherwise logits are divided by it before sampling."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches top_p; 1 keeps all."""
    eos_id: int | None = None
    """Stop a sequence once it emits this token (the rest of it is filled with EOS)."""
    seed: int = 0
    """Seed of the sampling draws (sampling is reproducible)."""

    def validate(self) -> None:
        """Raise ValueError("field: problem") for settings that cannot sample as asked: NaN fails
        every comparison and infinity would sample uniformly, so both are refused."""
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature: must be a finite number >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0 (0 keeps all), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1] (1 keeps all), got {self.top_p}")


@dataclass
class Generation:
    tokens: torch.Tensor
    """(batch, prompt_len + generated): the prompt followed by the new tokens."""
    prompt_len: int
    stopped: str
    """'eos' (every sequence emitted EOS), 'max_new_tokens' or 'max_seq_len'."""
    step_logits: list[torch.Tensor] = field(default_factory=list)
    """With keep_logits: the model's (batch, vocab) fp32 logits at each new token (before
    generate's allowed_vocab masks the ids past it)."""

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.tokens[:, self.prompt_len:]


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits with everything outside top-k and the top-p nucleus set to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p: the top one always stays.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """(batch, vocab) fp32 logits -> (batch,) token ids."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    # Shifted so the largest is 0 and in float64: any finite temperature > 0, however small,
    # divides without overflow (the most likely tokens stay finite, the rest go to -inf).
    logits = (logits.double() - logits.amax(dim=-1, keepdim=True).double()) / sampling.temperature
    logits = filter_logits(logits, sampling.top_k, sampling.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def check_prompt(prompt_len: int, max_seq_len: int) -> None:
    if prompt_len < 1:
        raise PromptTooLong("prompt: empty; give at least one token of text")
    if prompt_len > max_seq_len:
        raise PromptTooLong(f"prompt: {prompt_len} tokens exceed the model's max_seq_len={max_seq_len}; "
                            f"shorten it to at most {max_seq_len} tokens")


def last_logits(model, ids: torch.Tensor, caches: list) -> torch.Tensor:
    """(batch, vocab) fp32 logits of the last position only (a long prompt's others are never needed)."""
    hidden = model.hidden_states(ids, caches=caches)[:, -1]
    return torch.nn.functional.linear(hidden, model.head_weight).float()


def prefill(model, prompt: torch.Tensor, caches: list, chunk: int = DEFAULT_PREFILL_CHUNK) -> torch.Tensor:
    """Feed `prompt` (batch, len) into `caches` in pieces of at most `chunk` tokens; returns the
    last position's logits, as last_logits of the whole prompt at once."""
    if chunk < 1:
        raise ValueError(f"prefill_chunk: must be >= 1, got {chunk}")
    *pieces, last = prompt.split(chunk, dim=1)
    for piece in pieces:
        model.hidden_states(piece, caches=caches)
    return last_logits(model, last, caches)


def mask_past_vocab(logits: torch.Tensor, allowed_vocab: int | None) -> torch.Tensor:
    """Logits with ids >= allowed_vocab set to -inf: a model's vocabulary padded past its
    tokenizer's (e.g. to a multiple for TP) has rows no tokenizer can decode."""
    if allowed_vocab is None or allowed_vocab >= logits.shape[-1]:
        return logits
    return logits.index_fill(-1, torch.arange(allowed_vocab, logits.shape[-1], device=logits.device),
                             float("-inf"))


@torch.no_grad()
def generate(model, prompt: torch.Tensor | list[int], sampling: Sampling | None = None,
             keep_logits: bool = False, allowed_vocab: int | None = None,
             prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> Generation:
    """Generate after `prompt` ((batch, len) ids or one list of ids) with `model` (a HybridLM).

    allowed_vocab: ids >= it are never chosen, greedy or sampled (pass the tokenizer's vocabulary
    size when the model's is padded past it); None allows every id of the model.
    prefill_chunk: the prompt goes through the model this many tokens at a time (chunked prefill)."""
    sampling = sampling or Sampling()
    sampling.validate()
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk: must be >= 1, got {prefill_chunk}")
    if allowed_vocab is not None and allowed_vocab < 1:
        raise ValueError(f"allowed_vocab: must be >= 1, got {allowed_vocab}")
    param = next(model.parameters())
    prompt = torch.as_tensor(prompt, dtype=torch.long, device=param.device)
    prompt = prompt[None] if prompt.dim() == 1 else prompt
    batch, prompt_len = prompt.shape
    max_seq_len = model.cfg.max_seq_len
    check_prompt(prompt_len, max_seq_len)
    budget = min(sampling.max_new_tokens, max_seq_len - prompt_len)
    generator = None
    if sampling.temperature > 0:
        generator = torch.Generator(device=param.device).manual_seed(sampling.seed)

    was_training = model.training
    model.eval()
    caches = model.allocate_caches(batch, prompt_len + budget, device=param.device, dtype=param.dtype)
    tokens, step_logits = [prompt], []
    finished = torch.zeros(batch, dtype=torch.bool, device=param.device)
    logits = prefill(model, prompt, caches, prefill_chunk)
    stopped = "max_new_tokens" if budget == sampling.max_new_tokens else "max_seq_len"
    for step in range(budget):
        if keep_logits:
            step_logits.append(logits)
        nxt = choose_next(mask_past_vocab(logits, allowed_vocab), sampling, generator)
        if sampling.eos_id is not None:
            nxt = nxt.masked_fill(finished, sampling.eos_id)
            finished |= nxt == sampling.eos_id
        tokens.append(nxt[:, None])
        if sampling.eos_id is not None and bool(finished.all()):
            stopped = "eos"
            break
        if step + 1 < budget:
            logits = last_logits(model, nxt[:, None], caches)
    model.train(was_training)
    return Generation(torch.cat(tokens, dim=1), prompt_len, stopped, step_logits)
