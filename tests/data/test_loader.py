"""TrainLoader: rank sharding, exact resume on another DP size, boundaries, prefetch; eval batches."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
import torch

from strata.data.corpus import open_corpus
from strata.data.errors import DataError
from strata.data.loader import TrainLoader, eval_batches

SEQ = 16


def take(loader: TrainLoader, steps: int) -> list[tuple[dict, list]]:
    out = []
    for _ in range(steps):
        batch = next(loader)
        out.append((batch, list(loader.last_sample_ids)))
    return out


def run_job(corpus, cfg, dp: int, steps: int, mb: int = 4, state: dict | None = None):
    """Simulate a DP job: every rank takes ``steps`` micro-batches; return ids by global position."""
    by_position: dict[int, tuple] = {}
    final_states = []
    for rank in range(dp):
        loader = TrainLoader(corpus, cfg, SEQ, mb, rank, dp, seed=11)
        if state is not None:
            loader.load_state_dict(state)
        for step, (batch, ids) in enumerate(take(loader, steps)):
            for j, sample in enumerate(ids):
                position = loader.global_position(step * mb + j)
                assert position not in by_position
                window = corpus.train[sample[0]].window(sample[1], SEQ)
                assert torch.equal(batch["input_ids"][j], torch.from_numpy(window[:-1]))
                assert torch.equal(batch["labels"][j], torch.from_numpy(window[1:]))
                by_position[position] = sample
        final_states.append(loader.state_dict())
        loader.close()
    assert all(s == final_states[0] for s in final_states)  # every rank agrees on the cursor
    return by_position, final_states[0]


def test_ranks_partition_an_epoch(small_corpus):
    cfg, _ = small_corpus
    corpus = open_corpus(cfg)
    n = corpus.train[0].num_samples(SEQ)
    mb = 8
    single, _ = run_job(corpus, cfg, dp=1, steps=-(-n // mb), mb=mb)
    epoch = [single[g] for g in range(n)]
    assert sorted(s for _, s in epoch) == list(range(n))  # one epoch: every sample once, none repeated
    for dp in (2, 3):
        sharded, state = run_job(corpus, cfg, dp=dp, steps=-(-n // (mb * dp)), mb=mb)
        assert state["cursor"] == len(sharded) >= n
        assert Counter(sharded[g] for g in range(n)) == Counter(epoch)
        assert all(sharded[g] == single[g] for g in range(n))  # same sample at every global position


def test_resume_on_other_dp_sizes_continues_exactly(small_corpus):
    cfg, _ = small_corpus
    corpus = open_corpus(cfg)
    unbroken, _ = run_job(corpus, cfg, dp=1, steps=26)
    first, state = run_job(corpus, cfg, dp=2, steps=5)
    assert state["cursor"] == 40 and state["epoch"] == 0
    for dp in (1, 4):
        rest, final = run_job(corpus, cfg, dp=dp, steps=(104 - 40) // (4 * dp), state=state)
        assert sorted(rest) == list(range(40, 104))
        assert {**first, **rest} == unbroken
        assert final["cursor"] == 104


def test_epochs_roll_over_with_a_new_order(small_corpus):
    cfg, _ = small_corpus
    corpus = open_corpus(cfg)
    n = corpus.train[0].num_samples(SEQ)
    loader = TrainLoader(corpus, cfg, SEQ, 1, 0, 1, seed=3)
    ids = [s for _, batch_ids in take(loader, 2 * n + 1) for _, s in batch_ids]
    assert sorted(ids[:n]) == sorted(ids[n:2 * n]) == list(range(n))
    assert ids[:n] != ids[n:2 * n]
    assert loader.state_dict()["epoch"] == 2
    loader.close()


def test_state_counts_consumed_not_prefetched(small_corpus):
    cfg, _ = small_corpus
    loader = TrainLoader(open_corpus(cfg), cfg, SEQ, 4, 1, 2, seed=0)
    take(loader, 3)
    time.sleep(0.2)  # let the thread fill its prefetch queue
    assert loader._queue.qsize() > 0
    assert loader.state_dict()["cursor"] == 3 * 4 * 2
    assert loader.last_wait_s < 0.05  # the batch was ready
    loader.close()


def test_load_state_rejects_another_corpus_shape(small_corpus):
    cfg, _ = small_corpus
    corpus = open_corpus(cfg)
    state = TrainLoader(corpus, cfg, SEQ, 2, 0, 1, seed=0).state_dict()
    other = TrainLoader(corpus, cfg, SEQ * 2, 2, 0, 1, seed=0)
    with pytest.raises(DataError, match="seq_len"):
        other.load_state_dict(state)


def test_document_boundaries_reset_positions_and_mask_loss(small_corpus):
    cfg, _ = small_corpus
    cfg = type(cfg)(**{**vars(cfg), "doc_boundaries": True})
    corpus = open_corpus(cfg)
    eos = corpus.tokenizer.eos_id
    loader = TrainLoader(corpus, cfg, 64, 8, 0, 1, seed=0)
    saw_boundary = False
    for batch, _ in take(loader, 10):
        x, y, pos = batch["input_ids"].numpy(), batch["labels"].numpy(), batch["position_ids"].numpy()
        for row in range(x.shape[0]):
            expected_pos = 0
            for t in range(x.shape[1]):
                assert pos[row, t] == expected_pos
                expected_pos = 0 if x[row, t] == eos else expected_pos + 1
                if x[row, t] == eos:
                    saw_boundary = True
                    assert y[row, t] == -100
                else:
                    assert y[row, t] == (x[row, t + 1] if t + 1 < x.shape[1] else y[row, t]) and y[row, t] >= 0
    loader.close()
    assert saw_boundary
    plain = TrainLoader(corpus, type(cfg)(**{**vars(cfg), "doc_boundaries": False}), 64, 2, 0, 1, seed=0)
    assert "position_ids" not in next(plain) and plain.close() is None


def test_eval_batches_are_held_out_deterministic_and_sharded(small_corpus):
    cfg, docs = small_corpus
    corpus = open_corpus(cfg)
    one = eval_batches(corpus, cfg, SEQ, 2, 6)
    assert len(one) == 6 and one[0]["input_ids"].shape == (2, SEQ)
    again = eval_batches(corpus, cfg, SEQ, 2, 6)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(one, again))
    halves = [eval_batches(corpus, cfg, SEQ, 1, 6, dp_rank=r, dp_size=2) for r in range(2)]
    rows_single = [tuple(r.tolist()) for b in one for r in b["input_ids"]]
    rows_split = [tuple(b["input_ids"][0].tolist()) for pair in zip(*halves) for b in pair]
    assert rows_single == rows_split
    # Held out: the val tokens are exactly the tail documents of each shard, never in train.
    val_text = corpus.tokenizer.decode(corpus.val[0].read(0, corpus.val[0].total_tokens))
    train_text = corpus.tokenizer.decode(corpus.train[0].read(0, corpus.train[0].total_tokens))
    val_docs = [d for d in docs if d and d in val_text]
    assert val_docs and not any(d in train_text for d in val_docs)


def test_loader_errors_surface_on_the_training_thread(small_corpus, monkeypatch):
    cfg, _ = small_corpus
    corpus = open_corpus(cfg)
    loader = TrainLoader(corpus, cfg, SEQ, 2, 0, 1, seed=0)

    def broken(*_):
        raise DataError("shard x failed its checksum")
    monkeypatch.setattr(corpus.train[0], "window", broken)
    with pytest.raises(DataError, match="checksum"):
        next(loader)
    assert np.isfinite(loader.last_wait_s)


def test_start_up_reads_no_shard_and_verifies_each_shard_once_lazily(small_corpus, monkeypatch):
    import strata.data.shards as shards
    cfg, _ = small_corpus
    verified = []
    real = shards.verify_shard_checksums
    monkeypatch.setattr(shards, "verify_shard_checksums", lambda root, m, info: (verified.append(info["name"]), real(root, m, info)))
    corpus = open_corpus(cfg)
    assert verified == []  # start-up: sizes only
    stream = corpus.train[0]
    stream.read(0, stream.total_tokens)
    stream.read(0, stream.total_tokens)
    assert sorted(verified) == sorted(set(verified)) and len(verified) == len(stream.segments)
