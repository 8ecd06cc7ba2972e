"""`strata export`, `strata import` and `strata generate` on real checkpoints written by
`strata train` (one process, and ZeRO-2/3 over two ranks), checked against transformers."""
import shutil
import sys

import pytest
import torch

from strata.launcher import export as export_cli, import_hf as import_cli
from strata.launcher.config import load_run_config as run_config
from strata.model.generate import Sampling, generate
from strata.model.hf import load_weights
from strata.model.hybrid import HybridLM
from strata.parallel.checkpoint.consolidate import consolidate, resolve_checkpoint
from tests.launcher.conftest import TINY, run_strata

transformers = pytest.importorskip("transformers")

TEXT = "def add(a, b):\n    return a + b  # 12 apples\n"


def train(run_dir, corpus_overrides, *extra, nproc=1, steps=2):
    proc = run_strata(["train", *TINY, *corpus_overrides, f"train.max_steps={steps}", f"train.run_dir={run_dir}",
                       "train.eval_every=0", f"checkpoint.every={steps}", *extra], nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def strata_model(run_dir) -> HybridLM:
    ckpt = resolve_checkpoint(run_dir)
    model = HybridLM(run_config(ckpt).model).eval()
    model.load_state_dict(consolidate(ckpt))
    return model


def strata_tokenizer(run_dir):
    from strata.data.tokenizer import Tokenizer

    ckpt = resolve_checkpoint(run_dir)
    return Tokenizer(export_cli.find_tokenizer(ckpt, None))


def one_error_line(proc, code: int = 2) -> str:
    """The one line a mistake gets, and its exit code (docs/OPERATIONS.md: 2 a request that cannot run as
    asked, 1 a file that is missing or damaged)."""
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_overrides):
    return train(tmp_path_factory.mktemp("trained") / "run", corpus_overrides)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported") / "hf"
    proc = run_strata(["export", "--checkpoint", str(trained), "--format", "hf", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BambaForCausalLM" in proc.stdout  # M-*- with RoPE and SwiGLU: only Bamba expresses it
    assert proc.stderr == "" and proc.stdout.startswith("exported "), proc.stderr  # no library's line first
    return out


def test_exported_directory_loads_in_transformers_with_strata_logits(trained, exported):
    theirs = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    ours = strata_model(trained)
    ids = torch.tensor([strata_tokenizer(trained).encode(TEXT * 3)])
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)).abs().max().item() <= 1e-4


def test_exported_tokenizer_encodes_and_decodes_as_strata(trained, exported):
    theirs = transformers.AutoTokenizer.from_pretrained(exported)
    ours = strata_tokenizer(trained)
    for text in (TEXT, "x  =  [1,\t2]\n\n", "héllo wörld ∑ 😀", "for i in range(10):\n    print(i)"):
        ids = theirs(text)["input_ids"]
        assert ids == ours.encode(text), text
        assert theirs.decode(ids) == text
    assert theirs.eos_token_id == ours.eos_id and theirs.bos_token_id == ours.bos_id


def test_transformers_greedy_generation_equals_strata_generate(trained, exported):
    theirs = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    ours = strata_model(trained)
    prompt = strata_tokenizer(trained).encode(TEXT)
    want = generate(ours, prompt, Sampling(max_new_tokens=12)).tokens[0].tolist()
    got = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert got[0].tolist() == want


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_export_from_a_two_rank_zero_checkpoint_gathers_the_same_model(zero_stage, corpus_overrides, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run_dir = train(tmp_path / "run", corpus_overrides, f"parallel.zero_stage={zero_stage}", nproc=2)
    ckpt = resolve_checkpoint(run_dir)
    reference = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)  # DeepSpeed's own tool
    ours = consolidate(ckpt)
    assert sorted(ours) == sorted(reference)
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
    out = tmp_path / "hf"
    assert run_strata(["export", "--checkpoint", str(run_dir), "--out", str(out)]).returncode == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    model = HybridLM(run_config(ckpt).model).eval()
    model.load_state_dict(reference)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 40))
    with torch.no_grad():
        assert (theirs(ids).logits - model(ids)).abs().max().item() <= 1e-4


def test_import_round_trips_and_train_starts_from_the_imported_weights(exported, corpus_overrides, tmp_path):
    run_dir = tmp_path / "imported"
    not_model = [o for o in TINY + corpus_overrides if not o.startswith(("model.", "data.prepared_dir"))]
    proc = run_strata(["import", "--format", "hf", "--from", str(exported), "--out", str(run_dir), *not_model,
                       f"data.prepared_dir={tmp_path / 'prepared'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = consolidate(resolve_checkpoint(run_dir))
    back = tmp_path / "back"
    assert run_strata(["export", "--checkpoint", str(run_dir), "--out", str(back)]).returncode == 0
    original, again = load_weights(exported), load_weights(back)
    assert sorted(again) == sorted(original) and all(torch.equal(again[k], original[k]) for k in original)
    # One step at a negligible learning rate: the weights stay the imported ones (a fresh init would not).
    proc = run_strata(["train", "--config", str(run_dir / "config.yaml"), "train.max_steps=1", "train.lr=1.0e-12",
                       "train.warmup_steps=0", "train.weight_decay=0", "train.eval_every=0", "checkpoint.every=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    after_ckpt = resolve_checkpoint(run_dir)
    assert after_ckpt.name == "step_00000001"
    after = consolidate(after_ckpt)
    assert max((after[k] - imported[k]).abs().max().item() for k in imported) < 1e-6


def test_generate_cli_prints_the_greedy_continuation(trained):
    proc = run_strata(["generate", "--checkpoint", str(trained), "--prompt", TEXT, "--max-new-tokens", "8"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    tok = strata_tokenizer(trained)
    out = generate(strata_model(trained), tok.encode(TEXT), Sampling(max_new_tokens=8, eos_id=tok.eos_id))
    new = out.new_tokens[0].tolist()
    assert proc.stdout == TEXT + tok.decode(new[:-1] if out.stopped == "eos" else new) + "\n"


# ----------------------------------------------------------------------------------------
# Bad input: one clear error line each
# ----------------------------------------------------------------------------------------

def test_a_missing_checkpoint_is_one_error_line(tmp_path):
    line = one_error_line(run_strata(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]),
                          code=1)
    assert "does not exist" in line


def test_a_partial_checkpoint_is_one_error_line(trained, tmp_path):
    partial = tmp_path / "run" / "checkpoints" / "step_00000002"
    shutil.copytree(resolve_checkpoint(trained), partial)
    (partial / "trainer.json").unlink()  # what a save killed midway leaves
    line = one_error_line(run_strata(["export", "--checkpoint", str(partial), "--out", str(tmp_path / "o")]), code=1)
    assert "incomplete" in line
    line = one_error_line(run_strata(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "x"]), code=1)
    assert "no complete checkpoint" in line


def test_a_directory_that_is_not_a_supported_hf_model_is_one_error_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_error_line(run_strata(["import", "--from", str(empty), "--out", str(tmp_path / "r1")]))
    assert "no config.json" in line
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text('{"model_type": "llama"}')
    line = one_error_line(run_strata(["import", "--from", str(llama), "--out", str(tmp_path / "r2")]))
    assert "'llama'" in line and "nemotron_h" in line


def test_a_partial_hf_directory_is_one_error_line(exported, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copyfile(exported / "config.json", partial / "config.json")
    line = one_error_line(run_strata(["import", "--from", str(partial), "--out", str(tmp_path / "r")]))
    assert "no weights" in line


def test_a_prompt_longer_than_the_model_limit_is_one_error_line(trained):
    long_prompt = "x = 1\n" * 1200  # well over the run's max_seq_len of 1024 tokens
    line = one_error_line(run_strata(["generate", "--checkpoint", str(trained), "--prompt", long_prompt]))
    assert "max_seq_len=1024" in line


def test_an_inexpressible_target_is_refused_naming_the_feature_and_what_works(trained, tmp_path):
    proc = run_strata(["export", "--checkpoint", str(trained), "--arch", "nemotron_h", "--out", str(tmp_path / "o")])
    line = one_error_line(proc)
    assert "RoPE" in line and "--arch bamba" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["export", "import"])
def test_without_transformers_export_and_import_say_how_to_install_it(command, trained, tmp_path, monkeypatch,
                                                                       capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    if command == "export":
        code = export_cli.main(["--checkpoint", str(trained), "--out", str(tmp_path / "o")])
    else:
        code = import_cli.main(["--from", str(tmp_path), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "pip install 'strata[hf]'" in err


# ----------------------------------------------------------------------------------------
# In-process: structured MLPs pre-merge; an HF NemotronH directory imports as a run
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("structure,extra", [("lowrank", {"rank": 16}), ("blockshuffle", {"nblocks": 4}),
                                             ("blockdense", {"rank": 32, "nblocks": 4, "self_guided": True})])
def test_structured_mlps_export_pre_merged_into_dense_weights(structure, extra, tmp_path):
    from strata.model import hf
    from strata.model.config import MLPConfig, ModelConfig

    cfg = ModelConfig(pattern="M-*-M-", d_model=64, vocab_size=97, tie_embeddings=False,
                      mlp=MLPConfig(structure=structure, dense_first_layer=False, **extra))
    torch.manual_seed(0)
    model = HybridLM(cfg).eval()
    state = model.state_dict()
    if cfg.mlp.self_guided:  # a checkpoint written after the guided phase: the dense paths are gone
        state = {k: v for k, v in state.items() if not k.endswith(".guide")}
        for m in model.modules():
            if hasattr(m, "drop_guide"):
                m.drop_guide()
    merged, dense_cfg = export_cli.premerge_structured(state, cfg)
    assert dense_cfg.mlp.structure == "dense" and all("guide" not in k for k in merged)
    config = hf.build_hf_config(dense_cfg, "bamba")
    theirs = transformers.AutoModelForCausalLM.from_config(config).eval()
    theirs.load_state_dict(hf.to_hf_state_dict(merged, dense_cfg, "bamba"))
    ids = torch.randint(0, 97, (2, 33))
    with torch.no_grad():
        assert (theirs(ids).logits - model(ids)).abs().max().item() <= 1e-4


def test_an_hf_nemotron_h_directory_imports_as_a_run_that_names_the_tokenizer_gap(tmp_path, capsys):
    config = transformers.AutoConfig.for_model(
        "nemotron_h", vocab_size=97, hidden_size=64, layers_block_type=["linear_attention", "full_attention", "mlp"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96, ssm_state_size=16,
        mamba_num_heads=4, mamba_head_dim=32, n_groups=2, chunk_size=16)
    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(config).eval()
    theirs.save_pretrained(tmp_path / "hf")
    code = import_cli.main(["--from", str(tmp_path / "hf"), "--out", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "data.tokenizer" in captured.err  # the thing to know (its time_step_min is clamped as transformers does)
    ckpt = resolve_checkpoint(tmp_path / "run")
    cfg = run_config(ckpt)
    assert cfg.model.pattern == "M*-" and cfg.model.attention.rope is False and cfg.train.run_dir == str(tmp_path / "run")
    ours = HybridLM(cfg.model).eval()
    ours.load_state_dict(consolidate(ckpt))
    ids = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)).abs().max().item() <= 1e-4
