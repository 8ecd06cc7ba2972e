"""Training on packed documents (data.doc_boundaries: true) logs the same losses and gradient norms
(over every stage's parameters, before clipping, at ZeRO 0) on 1 rank, on 2
(PP2: the loader's position ids travel between the stages, and every block keeps the documents
apart) and on 4 (TP2 with sequence parallelism x PP2: each rank holds part of a row's tokens and
of its heads). tests/parallel/test_packed.py proves each layout equal to the documents run alone.
The corpus holds short documents (JSONL, 40-300 characters), so most rows pack several."""
import json
import random
import sysconfig
from pathlib import Path

import pytest

from tests.launcher.conftest import TINY, run_strata, train_grad_norms, train_losses

STEPS = 3


def short_documents(path: Path) -> Path:
    rng = random.Random(0)
    text = "".join(p.read_text() for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[a-c]*.py"))[:12])
    docs, start = [], 0
    while start < len(text) and len(docs) < 2000:
        n = rng.randint(40, 300)
        docs.append(text[start:start + n])
        start += n
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def test_packed_training_same_losses_on_one_two_and_four_ranks(tmp_path):
    corpus = short_documents(tmp_path / "docs.jsonl")
    common = [*TINY, f"data.inputs=[{corpus}]", "data.vocab_size=512", "data.val_fraction=0.05", "data.workers=1",
              f"data.prepared_dir={tmp_path / 'prepared'}", "data.doc_boundaries=true", "train.seq_len=64",
              "model.mamba.ngroups=2",  # TP2 splits the groups
              f"train.max_steps={STEPS}", "train.eval_every=0", "checkpoint.every=0"]
    one = run_strata(["train", *common, f"train.run_dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_strata(["train", *common, "parallel.pp=2", f"train.run_dir={tmp_path / 'two'}"], nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    four = run_strata(["train", *common, "parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true",
                       f"train.run_dir={tmp_path / 'four'}"], nproc=4)
    assert four.returncode == 0, four.stderr[-3000:]
    want = train_losses(tmp_path / "one")
    assert sorted(want) == list(range(1, STEPS + 1)), want
    for run in ("two", "four"):
        got = train_losses(tmp_path / run)
        assert [got[s] for s in sorted(want)] == pytest.approx([want[s] for s in sorted(want)], rel=1e-5), run
    want_norms = train_grad_norms(tmp_path / "one")
    assert all(norm > 0 for norm in want_norms.values()), want_norms
    for run in ("two", "four"):
        got = train_grad_norms(tmp_path / run)
        assert [got[s] for s in sorted(want_norms)] == pytest.approx([want_norms[s] for s in sorted(want_norms)],
                                                                     rel=1e-6), run
