"""docs/CONTINUED_PRETRAINING.md, run (issue 22, item 4): every ```bash and ```python block of the guide
marked `<!-- test: NAME -->` runs as written, in order, in one temporary directory holding what the guide
starts from (a tiny NemotronH built and briefly trained by transformers from the published Nemotron-H-8B
config.json, with a `tokenizers` BPE tokenizer; Parquet files; a JSONL of "the user's own data"), after the
guide's own table of replacements ("How this page is tested") shrinks the sizes. A command edited in the
guide is the command run here; one that no longer works fails here."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import sysconfig
import threading
import types
from pathlib import Path

import pytest
import torch

from strata.data.tokenizer import Tokenizer
from tests.data.data_helpers import write_bpe_tokenizer
from tests.launcher.conftest import REPO, train_losses
from tests.model.test_published_configs import published

transformers = pytest.importorskip("transformers")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

GUIDE = REPO / "docs" / "CONTINUED_PRETRAINING.md"
MODEL_DIR = "hf/Nemotron-H-8B-Base-8K"  # where the guide's download puts the published model
VOCAB = 512
# The published config.json (tests/model/fixtures/published) cut to a model a 2-core CPU trains in seconds:
# 5 layers of width 64; 8 Mamba2 heads of 16 (expand 2, its 8 groups) with a state of 16; 4 query and 2 KV
# heads of 16; SSD chunks of 32 (transformers' PyTorch SSD trains 64-token rows several times slower in the
# published chunks of 128)
CUT = dict(hidden_size=64, hybrid_override_pattern="M-M*-", num_hidden_layers=5, mamba_num_heads=8,
           mamba_head_dim=16, ssm_state_size=16, chunk_size=32, num_attention_heads=4, num_key_value_heads=2,
           attention_head_dim=16, head_dim=16, intermediate_size=128, vocab_size=VOCAB)
PRETRAIN_STEPS = 20
KILL_AFTER_STEP = 2
STEPS = ["import", "prepare", "plan", "train", "export", "generate", "transformers"]  # the guide's, in order
NOT_TESTED = {"hf download"}  # the one block that is not run: it needs the network


# ----------------------------------------------------------------------------------------
# The guide: its blocks and its table of replacements
# ----------------------------------------------------------------------------------------

def guide_blocks(text: str) -> dict[str, tuple[str, str]]:
    """NAME -> (language, code) of each block marked <!-- test: NAME -->, in the guide's order. Every
    ```bash / ```python block must carry a mark, and those marked <!-- not tested: WHY --> are NOT_TESTED
    (named by their first two words)."""
    marked = re.findall(r"<!-- (test|not tested): ([^\n]*?) -->\n```(bash|python)\n(.*?)^```$", text, re.S | re.M)
    fences = re.findall(r"^```(?:bash|python)$", text, re.M)
    assert len(marked) == len(fences), "a ```bash or ```python block of the guide has no <!-- test: NAME --> mark"
    untested = {" ".join(code.split()[:2]) for kind, _, _, code in marked if kind == "not tested"}
    assert untested == NOT_TESTED, f"blocks the test does not run: {untested}"
    blocks = {name: (lang, code) for kind, name, lang, code in marked if kind == "test"}
    assert len(blocks) == sum(kind == "test" for kind, *_ in marked), "two blocks share a name"
    return blocks


def replacements(text: str) -> list[tuple[str, str]]:
    """The rows of the guide's table under "## How this page is tested": (`in the page`, `in the test`)."""
    section = text.split("## How this page is tested", 1)[1]
    return re.findall(r"^\| `([^`]+)` \| `([^`]+)` \|", section, re.M)


def blocks_as_run() -> dict[str, tuple[str, str]]:
    text = GUIDE.read_text()
    blocks = guide_blocks(text)
    table = replacements(text)
    assert len(table) >= 10, table
    for old, new in table:
        assert any(old in code for _, code in blocks.values()), f"the guide's replacement {old!r} matches no block"
        blocks = {name: (lang, code.replace(old, new)) for name, (lang, code) in blocks.items()}
    return blocks


def block_command(lang: str, code: str) -> list[str]:
    return ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]


def environment() -> dict:
    """`strata`, `torchrun` and `python` of this interpreter's environment first on PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run_block(block: tuple[str, str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(block_command(*block), cwd=cwd, env=environment(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{block[1]}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def run_block_and_stop_it(block: tuple[str, str], cwd: Path, after_step: int) -> tuple[int, str]:
    """Run a training block and send its process group SIGTERM once step `after_step` is logged, as a
    scheduler does; (exit code, everything it printed) once every process of it has closed its output."""
    proc = subprocess.Popen(block_command(*block), cwd=cwd, env=environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    watchdog = threading.Timer(300, lambda: os.killpg(proc.pid, signal.SIGKILL))
    watchdog.start()
    lines, sent = [], False
    try:
        for line in proc.stdout:  # to EOF: the workers hold it open until they have saved
            lines.append(line)
            if not sent and re.match(rf"step +{after_step} \|", line):
                os.killpg(proc.pid, signal.SIGTERM)
                sent = True
        return proc.wait(), "".join(lines)
    finally:
        watchdog.cancel()


# ----------------------------------------------------------------------------------------
# What the guide starts from
# ----------------------------------------------------------------------------------------

def source_documents(pattern: str, count: int) -> list[str]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob(pattern))[:count]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def write_published_model(path: Path, documents: list[str]) -> None:
    """The published Nemotron-H-8B config.json cut to CUT, initialised by transformers, trained a few steps on
    `documents` (so that it predicts such text far better than chance), saved as transformers saves it, with
    a BPE tokenizer.json and tokenizer_config.json (<pad> 0, <s> 1, </s> 2, the published ids) beside it."""
    tokenizer = Tokenizer(write_bpe_tokenizer(path, vocab_size=VOCAB))
    config = transformers.AutoConfig.for_model(**dict(published("nemotron-h-8b-base-8k"), **CUT))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    ids = torch.tensor([t for doc in documents for t in tokenizer.encode(doc) + [tokenizer.eos_id]][:200_000])
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(PRETRAIN_STEPS):
        starts = torch.randint(0, len(ids) - 64, (8,), generator=generator).tolist()
        batch = torch.stack([ids[s:s + 64] for s in starts])
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(path)


def write_corpora(root: Path) -> tuple[list[str], list[str]]:
    """corpus/web/*.parquet (two files of several row groups, the text in `text`, an `id` beside it) and
    corpus/mine.jsonl (the text under `content`), as the guide describes them."""
    web, mine = source_documents("[a-f]*.py", 40), source_documents("[p-s]*.py", 20)
    (root / "corpus" / "web").mkdir(parents=True)
    for i in range(2):
        part = web[i::2]
        table = pa.table({"id": [f"{i}-{k}" for k in range(len(part))], "text": part})
        pq.write_table(table, root / "corpus" / "web" / f"train-{i:05d}-of-00002.parquet", row_group_size=5)
    (root / "corpus" / "mine.jsonl").write_text("".join(json.dumps({"content": doc}) + "\n" for doc in mine))
    return web, mine


@pytest.fixture(scope="module")
def guide(tmp_path_factory):
    """The guide's blocks run in order in one directory; what each printed."""
    root = tmp_path_factory.mktemp("continued_pretraining")
    blocks = blocks_as_run()
    assert list(blocks) == STEPS, list(blocks)
    web, mine = write_corpora(root)
    write_published_model(root / MODEL_DIR, web + mine)
    out = types.SimpleNamespace(root=root, web=web, mine=mine, ran={})
    for name in ("import", "prepare", "plan"):
        out.ran[name] = run_block(blocks[name], root)
    out.stopped_rc, out.stopped = run_block_and_stop_it(blocks["train"], root, KILL_AFTER_STEP)
    out.stopped_checkpoints = sorted(p.name for p in (root / "runs/cpt/checkpoints").glob("step_*"))
    for name in ("train", "export", "generate", "transformers"):  # train: the same command again
        out.ran[name] = run_block(blocks[name], root)
    return out


# ----------------------------------------------------------------------------------------
# Each step does what the guide says it does
# ----------------------------------------------------------------------------------------

def test_every_guide_command_is_marked_and_every_replacement_is_used():
    blocks = blocks_as_run()  # asserts both
    assert list(blocks) == STEPS
    assert "torchrun --standalone --nproc-per-node 2 -m strata.launcher.train" in blocks["train"][1]


def test_import_writes_the_run_with_the_tokenizer_and_prints_the_dt_note(guide):
    run, proc = guide.root / "runs/cpt", guide.ran["import"]
    assert proc.stdout.startswith(f"imported NemotronHForCausalLM from {MODEL_DIR} into "
                                  "runs/cpt/checkpoints/step_00000000; train with: strata train --config "
                                  "runs/cpt/config.yaml"), proc.stdout
    assert "note: NemotronH clamps dt to " in proc.stderr and "time_step_min=0.001" in proc.stderr, proc.stderr
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (run / name).read_bytes() == (guide.root / MODEL_DIR / name).read_bytes()
    assert len((run / "tokenizer.sha256").read_text().splitlines()) == 2


def test_prepare_tokenises_parquet_and_jsonl_with_the_models_tokenizer(guide):
    tokenizer = Tokenizer(guide.root / "runs/cpt")
    assert Tokenizer(guide.root / MODEL_DIR).sha256 == tokenizer.sha256  # the guide: either gives the same
    parquet = sorted((guide.root / "corpus/web").glob("*.parquet"))
    for corpus, docs, size in (("web", guide.web, sum(p.stat().st_size for p in parquet)),
                               ("mine", guide.mine, (guide.root / "corpus/mine.jsonl").stat().st_size)):
        manifest = json.loads((guide.root / "data" / corpus / "manifest.json").read_text())
        assert manifest["tokenizer"]["kind"] == "huggingface"
        assert manifest["tokenizer"]["sha256"] == tokenizer.sha256
        assert manifest["totals"]["docs"] == len(docs) and manifest["totals"]["input_bytes"] == size
        log = guide.ran["prepare"].stderr
        assert f"prepared data/{corpus}: {len(docs)} docs, " in log, log
    assert len(pq.ParquetFile(parquet[0]).metadata.to_dict()["row_groups"]) > 1


def test_plan_finds_a_layout_that_fits(guide):
    out = guide.ran["plan"].stdout
    assert "fits, fastest first" in out and "| tp=1 pp=1 dp=2 | 3 |" in out, out


def test_a_stopped_run_saves_and_the_same_command_resumes_it(guide):
    match = re.search(r"strata: stopped by SIGTERM at step (\d+): checkpoint runs/cpt/checkpoints/(step_\d+); "
                      r"run the same command again to resume", guide.stopped)
    assert match, guide.stopped[-3000:]
    assert guide.stopped_rc == 1 and "SignalException" in guide.stopped  # torchrun's, as the guide says
    step = int(match.group(1))
    assert KILL_AFTER_STEP <= step < 12 and match.group(2) == f"step_{step:08d}"
    assert f"step_{step:08d}" in guide.stopped_checkpoints
    assert "started from the weights of step_00000000 (imported), fresh optimizer, at step 0" in guide.stopped
    resumed = guide.ran["train"].stdout
    assert f"resumed from step_{step:08d} at step {step}" in resumed, resumed[-3000:]
    assert sorted(train_losses(guide.root / "runs/cpt")) == list(range(1, 13))
    assert (guide.root / "runs/cpt/checkpoints/step_00000012").is_dir()


def test_training_starts_from_the_imported_weights_on_the_mixture(guide):
    losses = train_losses(guide.root / "runs/cpt")
    assert losses[1] < 0.7 * math.log(VOCAB), losses  # a fresh model starts near ln(vocab) = 6.24
    assert all(math.isfinite(v) for v in losses.values())
    import yaml

    resolved = yaml.safe_load((guide.root / "runs/cpt/config.yaml").read_text())
    assert resolved["data"]["mixture"] == [{"dir": "data/web", "weight": 0.8}, {"dir": "data/mine", "weight": 0.2}]
    assert resolved["parallel"]["zero_stage"] == 3 and resolved["train"]["param_dtype"] == "bf16"


def test_export_writes_a_transformers_directory_with_the_tokenizer(guide):
    proc = guide.ran["export"]
    assert proc.stdout.startswith("exported runs/cpt as NemotronHForCausalLM to hf/cpt"), proc.stdout
    assert "note: written for transformers " in proc.stderr, proc.stderr
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (guide.root / "hf/cpt" / name).is_file(), name


def test_transformers_on_the_export_prints_what_strata_generate_prints(guide):
    prompt = "def fibonacci(n):"
    strata, theirs = guide.ran["generate"].stdout, guide.ran["transformers"].stdout
    assert strata.startswith(prompt) and len(strata) > len(prompt) + 8, strata
    assert theirs == strata
