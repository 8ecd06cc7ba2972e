"""A checkpoint of the self-guided phase, where training evaluates a W + (1 - a) S: `strata export`
writes that as dense weights and `strata generate` computes it, so transformers and generate give
the logits training's evaluation gives at that step (a = 0.75), and both say so."""
import pytest
import torch

from strata.launcher import export as export_cli, generate as generate_cli
from strata.launcher.config import load_run_config
from strata.launcher.generate import load_model
from strata.model.generate import Sampling, generate
from strata.model.guidance import SelfGuidance
from strata.model.hybrid import HybridLM
from strata.parallel.checkpoint.consolidate import consolidate
from strata.parallel.checkpoint.files import read_manifest
from tests.launcher.conftest import TINY, run_strata

transformers = pytest.importorskip("transformers")

# a decays linearly from 1 over T = 4 steps: the checkpoint after step 2 was evaluated at a = 0.75
GUIDED = ["model.mlp.structure=lowrank", "model.mlp.rank=8", "model.mlp.self_guided=true",
          "model.mlp.dense_first_layer=false", "model.mlp.guide_ratio=1.0", "model.mlp.guide_schedule=linear",
          "train.max_steps=4", "train.eval_every=0", "checkpoint.every=2", "checkpoint.keep_last=10"]
ALPHA = 0.75


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, corpus_overrides):
    run_dir = tmp_path_factory.mktemp("guided") / "run"
    proc = run_strata(["train", *TINY, *corpus_overrides, *GUIDED, f"train.run_dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir / "checkpoints" / "step_00000002"


def training_eval_model(ckpt) -> HybridLM:
    """The model as training's evaluation computes it at this checkpoint: its weights, a set by
    SelfGuidance for the step's forward from the state the checkpoint saved, eval mode."""
    cfg = load_run_config(ckpt)
    model = HybridLM(cfg.model)
    model.load_state_dict(consolidate(ckpt, cfg.model))
    guidance = SelfGuidance(model, cfg.model.mlp, cfg.train.max_steps, cfg.train.seed)
    manifest = read_manifest(ckpt)
    guidance.load_state_dict(manifest["self_guided"])
    assert guidance.update(manifest["step"] - 1) == pytest.approx(ALPHA) and guidance.guided_linears()
    return model.eval()


def prompt_ids():
    return torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))


def test_export_writes_the_dense_equivalent_training_evaluates(ckpt, tmp_path, capsys):
    out = tmp_path / "hf"
    assert export_cli.main(["--checkpoint", str(ckpt), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "note: step_00000002 is in the self-guided phase: exported the dense weights a W + (1 - a) S " \
           "with a = 0.75" in err
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = prompt_ids()
    with torch.no_grad():
        want = training_eval_model(ckpt)(ids)
        assert (theirs(ids).logits - want).abs().max().item() <= 1e-5


def test_generate_computes_what_training_evaluates(ckpt):
    cfg = load_run_config(ckpt)
    ours = load_model(ckpt, cfg, torch.device("cpu"))
    want = training_eval_model(ckpt)
    ids = prompt_ids()
    with torch.no_grad():
        assert (ours(ids) - want(ids)).abs().max().item() <= 1e-5
    out = generate(ours, ids, Sampling(max_new_tokens=5), keep_logits=True)
    with torch.no_grad():
        for step, logits in enumerate(out.step_logits):
            full = want(out.tokens[:, :ids.shape[1] + step])[:, -1]
            assert (logits - full).abs().max().item() <= 1e-5, step


def test_generate_cli_says_which_a_it_generates_with(ckpt, capsys):
    assert generate_cli.main(["--checkpoint", str(ckpt), "--prompt", "def f(x):", "--max-new-tokens", "4"]) == 0
    assert "self-guided phase: generating with a W + (1 - a) S with a = 0.75" in capsys.readouterr().err


def test_premerge_folds_the_dense_path_in_at_the_step_a(ckpt):
    cfg = load_run_config(ckpt)
    state = consolidate(ckpt, cfg.model)
    assert export_cli.self_guided_alpha(ckpt, state) == pytest.approx(ALPHA)
    merged, dense_cfg = export_cli.premerge_structured(state, cfg.model, ALPHA)
    dense = HybridLM(dense_cfg).eval()
    dense.load_state_dict(merged)
    ids = prompt_ids()
    with torch.no_grad():
        assert (dense(ids) - training_eval_model(ckpt)(ids)).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="self-guided"):
        export_cli.premerge_structured(state, cfg.model)  # a must be given: no silent default
