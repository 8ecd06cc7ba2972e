"""`strata train` on a directory of Parquet files (issue 22, item 2): the run prepares it (split by
row group, the text in another column named by data.text_field), says how far it is with each byte
counted once, and trains."""
import json
import math
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.launcher.conftest import TINY, run_strata, train_losses

STEPS = 3


def test_train_on_a_directory_of_parquet_files(tmp_path):
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[a-f]*.py"))
    docs = [p.read_text(encoding="utf-8", errors="replace") for p in sources][:60]
    corpus = tmp_path / "parquet"
    corpus.mkdir()
    half = len(docs) // 2
    for i, part in enumerate((docs[:half], docs[half:])):
        table = pa.table({"path": [f"doc{i}-{k}" for k in range(len(part))], "content": part})
        pq.write_table(table, corpus / f"train-{i:05d}-of-00002.parquet", row_group_size=4)
    size = sum(f.stat().st_size for f in corpus.iterdir())
    prepared = tmp_path / "prepared"
    proc = run_strata(["train", *TINY, f"data.inputs=[{corpus}]", "data.text_field=content", "data.vocab_size=512",
                       "data.val_fraction=0.05", "data.workers=2", f"data.shard_input_mb={size / 6 / 2**20}",
                       f"data.prepared_dir={prepared}", f"train.max_steps={STEPS}", "train.eval_every=0",
                       "checkpoint.every=0", f"train.run_dir={tmp_path / 'run'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    mb = f"{size / 2**20:.1f}"
    assert f"2/2 files, {mb}/{mb} MB (100%)" in proc.stderr, proc.stderr[-3000:]
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["totals"]["input_bytes"] == size and manifest["text_field"] == "content"
    assert manifest["totals"]["docs"] == sum(1 for d in docs if d) and len(manifest["shards"]) >= 4  # files split
    losses = train_losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in losses.values())
