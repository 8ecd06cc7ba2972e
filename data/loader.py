"""The training loader (background prefetch, resumable global cursor) and held-out eval batches.

Global batch semantics: the job's samples are numbered by one global cursor. Data-parallel rank
r of DP takes the global samples cursor + r, cursor + r + DP, ...; so after every rank has taken
k micro-batches of size mb the job has consumed k * mb * DP consecutive global samples, and the
cursor saved in a checkpoint means the same thing whatever DP resumes it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import numpy as np
import torch

from .config import DataConfig
from .corpus import Corpus, TokenStream
from .errors import DataError
from .sampling import GlobalSampler, mixture_schedule

log = logging.getLogger("strata.data")
STATE_VERSION = 1
IGNORE_INDEX = -100


def make_batch(windows: np.ndarray, eos_id: int, doc_boundaries: bool) -> dict:
    """Turn [mb, seq_len + 1] token windows into model inputs and next-token labels."""
    inputs, targets = windows[:, :-1], windows[:, 1:].copy()
    batch = {"input_ids": torch.from_numpy(np.ascontiguousarray(inputs)), "labels": None}
    if doc_boundaries:
        is_eos = inputs == eos_id
        # After an EOS the target is the first token of an unrelated document: no loss there.
        targets[is_eos] = IGNORE_INDEX
        batch["position_ids"] = torch.from_numpy(_positions_reset_after_eos(is_eos))
    batch["labels"] = torch.from_numpy(targets)
    return batch


def _positions_reset_after_eos(is_eos: np.ndarray) -> np.ndarray:
    """Position of each token within its document; the token after an EOS starts again at 0."""
    length = is_eos.shape[1]
    index = np.broadcast_to(np.arange(length, dtype=np.int64), is_eos.shape)
    starts = np.zeros(is_eos.shape, dtype=np.int64)
    starts[:, 1:] = np.where(is_eos[:, :-1], index[:, 1:], 0)
    return index - np.maximum.accumulate(starts, axis=1)


class TrainLoader:
    """Yields this rank's micro-batches forever (epochs roll over), prefetched by a thread."""

    def __init__(self, corpus: Corpus, cfg: DataConfig, seq_len: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int) -> None:
        if seq_len < 1 or micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"TrainLoader: bad seq_len={seq_len}, micro_batch_size={micro_batch_size}, "
                             f"dp_rank={dp_rank}, dp_size={dp_size}")
        self.corpus, self.cfg, self.seq_len = corpus, cfg, seq_len
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.seed = cfg.seed if cfg.seed >= 0 else seed
        sizes = [_require_samples(stream, seq_len, root, "train") for stream, root in zip(corpus.train, corpus.roots)]
        self.sampler = GlobalSampler(sizes, corpus.weights, self.seed)
        self.last_wait_s = 0.0
        self.last_sample_ids: list[tuple[int, int]] = []
        """(component, sample index) of each row of the last batch returned, for logs and tests."""
        self._start_cursor = 0
        self._consumed = 0  # samples this rank has returned since _start_cursor
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=cfg.prefetch)
        self._stop = threading.Event()

    # --- iteration -------------------------------------------------------------------------
    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> dict:
        if self._thread is None:
            self._start_thread()
        started = time.perf_counter()
        item = self._queue.get()
        self.last_wait_s = time.perf_counter() - started
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, ids = item
        self.last_sample_ids = ids
        self._consumed += self.micro_batch_size
        return batch

    def global_position(self, local_index: int) -> int:
        """Global sample position of this rank's ``local_index``-th sample since the cursor."""
        return self._start_cursor + self.dp_rank + local_index * self.dp_size

    def _start_thread(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.cfg.prefetch)
        first = self._consumed
        self._thread = threading.Thread(target=self._produce, args=(first, self._queue), daemon=True,
                                        name=f"strata-data-r{self.dp_rank}")
        self._thread.start()

    def _produce(self, first_local: int, out: queue.Queue) -> None:
        local = first_local
        try:
            while not self._stop.is_set():
                ids = [self.sampler(self.global_position(local + j)) for j in range(self.micro_batch_size)]
                windows = np.stack([self.corpus.train[c].window(s, self.seq_len) for c, s in ids])
                self._put(out, (make_batch(windows, self.corpus.tokenizer.eos_id, self.cfg.doc_boundaries), ids))
                local += self.micro_batch_size
        except BaseException as exc:  # surfaced by __next__ on the training thread
            self._put(out, exc)

    def _put(self, out: queue.Queue, item) -> None:
        while not self._stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    # --- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Global samples consumed (returned by __next__, not merely prefetched) by the job."""
        cursor = self._start_cursor + self._consumed * self.dp_size
        return {"version": STATE_VERSION, "cursor": cursor, "epoch": cursor // self.sampler.samples_per_epoch,
                "seed": self.seed, "samples_per_epoch": self.sampler.samples_per_epoch, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        """Continue at ``state['cursor']``; valid whatever dp_size saved it."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data loader state version {state.get('version')} is not {STATE_VERSION}: "
                            "resume with the Strata version that wrote the checkpoint")
        if state["samples_per_epoch"] != self.sampler.samples_per_epoch or state["seq_len"] != self.seq_len:
            raise DataError(f"checkpoint data cursor is for {state['samples_per_epoch']} samples/epoch at seq_len "
                            f"{state['seq_len']}, this run has {self.sampler.samples_per_epoch} at {self.seq_len}: "
                            "resume with the same data and seq_len, or drop the data state to start the data afresh")
        self.close()
        if state["seed"] != self.seed:
            log.warning("data seed %d from the checkpoint replaces %d", state["seed"], self.seed)
            self.seed = state["seed"]
            self.sampler = GlobalSampler(self.sampler.sizes, self.corpus.weights, self.seed)
        self._start_cursor = int(state["cursor"])
        self._consumed = 0

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def __del__(self) -> None:
        if hasattr(self, "_stop"):  # __init__ may have raised before creating it
            self._stop.set()


def _require_samples(stream: TokenStream, seq_len: int, root, split: str) -> int:
    n = stream.num_samples(seq_len)
    if n < 1:
        raise DataError(f"{root} has {stream.total_tokens} {split} tokens, fewer than seq_len + 1 = {seq_len + 1}: "
                        "use a shorter seq_len or prepare more data")
    return n


def eval_batches(corpus: Corpus, cfg: DataConfig, seq_len: int, batch_size: int, max_batches: int,
                 dp_rank: int = 0, dp_size: int = 1) -> list[dict]:
    """Deterministic held-out batches (no shuffle); rank r takes val samples r, r + DP, ...

    Every rank gets the same number of batches: min(max_batches, val samples // (batch_size * DP)),
    but at least one when there is any validation data (then samples repeat). [] when there is none.
    """
    sizes = [s.num_samples(seq_len) for s in corpus.val]
    present = [c for c, n in enumerate(sizes) if n > 0]
    if not present:
        log.warning("no validation data at seq_len %d (val_fraction %.3g): skipping eval", seq_len, cfg.val_fraction)
        return []
    schedule = mixture_schedule(tuple(corpus.weights[c] for c in present))
    n_batches = min(max_batches, max(1, sum(sizes) // (batch_size * dp_size)))
    batches = []
    for b in range(n_batches):
        rows = []
        for j in range(batch_size):
            which, local = schedule((b * batch_size + j) * dp_size + dp_rank)
            c = present[which]
            rows.append(corpus.val[c].window(local % sizes[c], seq_len))
        batches.append(make_batch(np.stack(rows), corpus.tokenizer.eos_id, cfg.doc_boundaries))
    return batches
