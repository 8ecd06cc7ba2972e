"""Packed documents under TP2 + sequence parallelism and under PP2: training on rows whose
position ids restart (several documents per row: of length 1, several in one SSD chunk,
across chunks, a boundary at a chunk edge) gives the losses, first-step gradients, final
parameters (and, without PP, logits) of one process running each document alone. One 2-rank
gloo job runs both layouts; the assertions read its results."""
from __future__ import annotations

import pytest
import torch

from tests.parallel import train_helpers
from tests.parallel.train_helpers import TENSOR_TOL, assert_trains_like_reference
from tests.parallel.dist_helpers import rel_error, spawned_results, write_result

STEPS, WORLD = 2, 2
# The documents of each row (SEQ = 16, SSD chunks of 8), one micro-batch = two rows.
ROWS = [[1, 7, 8], [3, 2, 11], [5, 1, 1, 9], [8, 8], [2, 3, 2, 9], [16], [12, 1, 3], [4, 4, 4, 4]]
LAYOUTS = {"tp2_sp": dict(tp=2, pp=1, sequence_parallel=True), "pp2": dict(tp=1, pp=2)}


def packed_micro_batches(step: int, positions: bool = False) -> list[tuple]:
    """train_helpers' micro-batches with position ids restarting as ROWS says."""
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in ROWS])
    batches = train_helpers.micro_batches_unpacked(step)
    return [(ids, labels, pos[2 * i:2 * i + 2]) for i, (ids, labels, _) in enumerate(batches)]


def documents(row: int):
    start = 0
    for n in ROWS[row]:
        yield start, start + n
        start += n


def alone_logits(model, ids: torch.Tensor, rows: range) -> torch.Tensor:
    return torch.cat([torch.cat([model(ids[i:i + 1, a:b]) for a, b in documents(r)], dim=1)
                      for i, r in enumerate(rows)])


def alone_training(cfg, steps: int) -> dict:
    """One process, every document run alone: the loss of a micro-batch is the sum of its
    documents' token losses over its token count, as the packed mean."""
    model = train_helpers.build_model(cfg)
    opt = train_helpers.optimizer(model.parameters())
    losses, first_grads = [], None
    for step in range(steps):
        opt.zero_grad()
        batches = packed_micro_batches(step)
        total = 0.0
        for m, (ids, labels, _) in enumerate(batches):
            loss = 0.0
            for i in range(ids.shape[0]):
                for a, b in documents(2 * m + i):
                    loss = loss + model(ids[i:i + 1, a:b], labels=labels[i:i + 1, a:b]) * (b - a) / ids.numel()
            (loss / len(batches)).backward()
            total += loss.item() / len(batches)
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_helpers.CLIP)
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(total)
    return {"losses": losses, "grads": first_grads, "params": dict(model.named_parameters()), "model": model}


def packed_worker(rank: int, world_size: int, out_dir: str) -> None:
    train_helpers.micro_batches_unpacked = train_helpers.micro_batches
    train_helpers.micro_batches = packed_micro_batches  # layout_training reads its batches through this name
    cfg = train_helpers.train_config()
    ref = alone_training(cfg, STEPS)
    results = {}
    for name, layout in LAYOUTS.items():
        run = train_helpers.layout_training(cfg, layout["tp"], layout["pp"], 0, STEPS,
                                            sequence_parallel=layout.get("sequence_parallel", False), positions=True)
        results[name] = train_helpers.compare_to_reference(run, ref, train_helpers.build_model(cfg), rel_error)
        if layout["pp"] == 1:
            ids, _, pos = packed_micro_batches(STEPS)[0]
            with torch.no_grad():
                got = run["module"](ids, position_ids=pos)
                results[name]["logits"] = rel_error(got, alone_logits(ref["model"], ids, range(2)))
    write_result(out_dir, rank, results)


@pytest.fixture(scope="module")
def packed_results(tmp_path_factory):
    return spawned_results(tmp_path_factory, "packed", packed_worker, WORLD)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_packed_documents_train_as_documents_alone(packed_results, name):
    assert_trains_like_reference(packed_results, name, STEPS)
    for rank, results in enumerate(packed_results):
        assert results[name].get("logits", 0.0) < TENSOR_TOL, f"rank {rank}: logits off by {results[name]['logits']:.2e}"
