"""A run on a Hugging Face fast tokenizer (a `tokenizers` BPE with <pad> <s> </s>, built here):
`strata train` with data.tokenizer=tokenizer.json prepares, trains and resumes; `strata generate`
and `strata export` work from the run's copy with the corpus and the tokenizer's directory
deleted; transformers' AutoTokenizer and AutoModelForCausalLM on the export give `strata
generate`'s greedy tokens; `strata import` brings the tokenizer.json along; a damaged one is one line."""
import json
import shutil
import types

import pytest
import torch

from strata.data.tokenizer import Tokenizer
from strata.launcher.config import load_run_config
from strata.model.generate import Sampling, generate
from strata.model.hybrid import HybridLM
from strata.parallel.checkpoint.consolidate import consolidate, resolve_checkpoint
from tests.data.data_helpers import write_bpe_tokenizer
from tests.launcher.conftest import TINY, run_strata, train_losses
from tests.launcher.test_self_contained import one_error_line, strata_from

TEXT = "def add(a, b):\n    return a + b\n"
CONFIG_FILES = ("tokenizer.json", "tokenizer_config.json")
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A run trained 2 steps, resumed to 4, on stdlib text prepared with the BPE tokenizer; then its
    corpus and the tokenizer's own directory deleted (a copy of the latter kept as `reference`)."""
    base = tmp_path_factory.mktemp("hf_tokenizer")
    tokenizer = write_bpe_tokenizer(base / "tokenizer")
    overrides = [*TINY, "data.inputs=[stdlib]", "data.stdlib_max_mb=0.3", f"data.tokenizer={tokenizer}",
                 "data.val_fraction=0.05", f"data.prepared_dir={base / 'corpus'}", "data.workers=2",
                 f"train.run_dir={base / 'run'}", "train.eval_every=0", "checkpoint.every=2"]
    first = run_strata(["train", *overrides, "train.max_steps=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    manifest = json.loads((base / "corpus" / "manifest.json").read_text())
    again = run_strata(["train", *overrides, "train.max_steps=4"])
    assert again.returncode == 0, again.stderr[-3000:]
    shutil.copytree(tokenizer.parent, base / "reference")
    shutil.rmtree(base / "corpus")
    shutil.rmtree(tokenizer.parent)
    return types.SimpleNamespace(run=base / "run", reference=base / "reference", manifest=manifest, resumed=again)


@pytest.fixture(scope="module")
def exported(hf, tmp_path_factory):
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("hf_export") / "hf"
    proc = strata_from(tmp_path_factory.mktemp("elsewhere"), ["export", "--checkpoint", str(hf.run), "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def generate_cli(run_dir, cwd):
    proc = strata_from(cwd, ["generate", "--checkpoint", str(run_dir), "--prompt", TEXT,
                             "--max-new-tokens", str(NEW_TOKENS)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_training_on_a_tokenizer_json_prepares_trains_resumes_and_keeps_its_files(hf):
    reference = Tokenizer(hf.reference / "tokenizer.json")
    assert hf.manifest["tokenizer"]["kind"] == "huggingface" and hf.manifest["tokenizer"]["eos_id"] == reference.eos_id
    assert hf.manifest["tokenizer"]["sha256"] == reference.sha256
    assert "resumed from step_00000002" in hf.resumed.stdout
    assert sorted(train_losses(hf.run)) == [1, 2, 3, 4]
    ckpt = resolve_checkpoint(hf.run)
    assert ckpt.name == "step_00000004" and load_run_config(ckpt).model.vocab_size == reference.vocab_size
    for name in CONFIG_FILES:
        assert (hf.run / name).read_bytes() == (hf.reference / name).read_bytes()
    assert Tokenizer(hf.run / "tokenizer.json").sha256 == reference.sha256
    assert len((hf.run / "tokenizer.sha256").read_text().splitlines()) == 2


def test_generate_runs_from_the_copy_with_the_corpus_and_the_tokenizer_deleted(hf, tmp_path):
    stdout = generate_cli(hf.run, tmp_path / "elsewhere")
    tok = Tokenizer(hf.run / "tokenizer.json")
    model = HybridLM(load_run_config(resolve_checkpoint(hf.run)).model).eval()
    model.load_state_dict(consolidate(resolve_checkpoint(hf.run)))
    out = generate(model, tok.encode(TEXT), Sampling(max_new_tokens=NEW_TOKENS, eos_id=tok.eos_id))
    new = out.new_tokens[0].tolist()
    assert stdout == TEXT + tok.decode(new[:-1] if out.stopped == "eos" else new) + "\n"


def test_export_writes_the_tokenizer_and_transformers_gives_strata_generates_greedy_tokens(hf, exported, tmp_path):
    transformers = pytest.importorskip("transformers")
    assert (exported / "tokenizer.json").read_bytes() == (hf.reference / "tokenizer.json").read_bytes()
    config = json.loads((exported / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<s>", "</s>", "<pad>")
    ours = Tokenizer(hf.reference)
    theirs_tok = transformers.AutoTokenizer.from_pretrained(exported)
    assert (theirs_tok.bos_token_id, theirs_tok.eos_token_id, theirs_tok.pad_token_id) == \
        (ours.bos_id, ours.eos_id, ours.pad_id)
    for text in (TEXT, "x  =  [1,\t2]\n\n", "héllo wörld ∑ 😀"):
        assert theirs_tok(text)["input_ids"] == ours.encode(text), text
        assert theirs_tok.decode(ours.encode(text)) == text
    model = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert model.config.eos_token_id == ours.eos_id
    prompt = theirs_tok(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)[0, prompt.shape[1]:].tolist()
    if ours.eos_id in got:  # generate stops there and prints what comes before
        got = got[:got.index(ours.eos_id)]
    assert generate_cli(hf.run, tmp_path) == TEXT + theirs_tok.decode(got) + "\n"
    strata_model = HybridLM(load_run_config(resolve_checkpoint(hf.run)).model).eval()
    strata_model.load_state_dict(consolidate(resolve_checkpoint(hf.run)))
    want = generate(strata_model, ours.encode(TEXT), Sampling(max_new_tokens=NEW_TOKENS)).new_tokens[0].tolist()
    with torch.no_grad():
        full = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    assert full[0, prompt.shape[1]:].tolist() == want  # token for token, EOS or not


def test_import_brings_the_tokenizer_json_along(hf, exported, tmp_path):
    run_dir = tmp_path / "imported"
    proc = strata_from(tmp_path, ["import", "--format", "hf", "--from", str(exported), "--out", str(run_dir),
                                  *[o for o in TINY if not o.startswith("model.")]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "has no tokenizer" not in proc.stderr
    for name in CONFIG_FILES:
        assert (run_dir / name).read_bytes() == (exported / name).read_bytes()
    cfg = load_run_config(resolve_checkpoint(run_dir))
    assert cfg.data.tokenizer == str(run_dir / "tokenizer.json")
    imported, original = Tokenizer(run_dir / "tokenizer.json"), Tokenizer(hf.run / "tokenizer.json")
    assert imported.special_ids == original.special_ids and imported.encode(TEXT) == original.encode(TEXT)
    assert generate_cli(run_dir, tmp_path / "elsewhere") == generate_cli(hf.run, tmp_path / "elsewhere")


def test_a_damaged_tokenizer_json_or_a_directory_without_one_is_one_line(hf, exported, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(exported, damaged)
    text = (damaged / "tokenizer.json").read_text()
    (damaged / "tokenizer.json").write_text(text[: len(text) // 3])
    (tmp_path / "doc.txt").write_text(TEXT * 20)
    line = one_error_line(strata_from(tmp_path, ["prepare", "--input", "doc.txt", "--out", "prepared",
                                                 "--tokenizer", str(damaged / "tokenizer.json")]), code=1)
    assert f"{damaged / 'tokenizer.json'} is not a tokenizer.json" in line and "replace it" in line
    line = one_error_line(strata_from(tmp_path, ["import", "--from", str(damaged), "--out", "run"]), code=1)
    assert f"{damaged / 'tokenizer.json'} is not a tokenizer.json" in line
    assert not (tmp_path / "run").exists()
    (tmp_path / "empty").mkdir()
    line = one_error_line(strata_from(tmp_path, ["prepare", "--input", "doc.txt", "--out", "prepared",
                                                 "--tokenizer", "empty"]), code=1)
    assert "data.tokenizer: empty holds no tokenizer (tokenizer.json or a sentencepiece tokenizer.model)" in line


def test_an_exported_tokenizer_adds_no_template_tokens_as_strata_encodes_none(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as Fast, processors

    from strata.launcher.export import write_tokenizer

    path = write_bpe_tokenizer(tmp_path / "llama_like")  # a post-processor that puts <s> first, as Llama's
    fast = Fast.from_file(str(path))
    fast.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast.save(str(path))
    ours = Tokenizer(path)
    assert transformers.AutoTokenizer.from_pretrained(path.parent)(TEXT)["input_ids"] == [1, *ours.encode(TEXT)]
    out = tmp_path / "out"
    out.mkdir()
    write_tokenizer(ours, out, max_len=1024)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert theirs(TEXT)["input_ids"] == ours.encode(TEXT) and theirs.bos_token_id == ours.bos_id == 1
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 1024
