"""The config is resolved once, before anything is built (launcher/train.py resolve_config), and
read only afterwards: a checkpoint never records a run whose config changed after that."""
import types

import pytest

from strata.launcher.config import ConfigError, dump_yaml, load_config
from strata.launcher.train import check_config_unchanged, resolve_config
from strata.model.guidance import equal_flops_extra_steps, guided_steps
from tests.launcher.conftest import TINY

GUIDED = ["model.mlp.structure=lowrank", "model.mlp.rank=8", "model.mlp.self_guided=true",
          "model.mlp.dense_first_layer=false", "model.mlp.guide_ratio=0.5"]


def test_resolution_settles_the_vocabulary_and_the_length_and_returns_the_steps_asked_for():
    cfg = load_config(None, [*TINY, *GUIDED, "model.mlp.equal_flops=true", "train.max_steps=6"])
    asked = resolve_config(cfg, tokenizer_vocab=512)
    assert cfg.model.vocab_size == 512 and asked == 6
    extra = equal_flops_extra_steps(cfg.model, 6, cfg.train.seq_len)
    assert extra > 0 and cfg.train.max_steps == 6 + extra and not cfg.model.mlp.equal_flops
    # the guided phase is a share of the steps asked for, whatever order the run builds things in
    assert guided_steps(cfg.model.mlp, asked) == 3
    # resolved again (a restart from config.yaml): nothing moves
    assert resolve_config(cfg, tokenizer_vocab=512) == 6 + extra and cfg.train.max_steps == 6 + extra


def test_a_vocabulary_smaller_than_the_tokenizers_is_one_line():
    cfg = load_config(None, [*TINY, "model.vocab_size=256"])
    with pytest.raises(ConfigError, match="model.vocab_size: 256 is smaller than the tokenizer's 512; set "
                                          "model.vocab_size=512"):
        resolve_config(cfg, tokenizer_vocab=512)


def test_a_config_changed_after_resolution_is_never_saved():
    cfg = load_config(None, TINY)
    resolve_config(cfg, tokenizer_vocab=512)
    run = types.SimpleNamespace(cfg=cfg, resolved_config=dump_yaml(cfg))
    check_config_unchanged(run)  # untouched: nothing to say
    cfg.train.lr = 1.0
    with pytest.raises(RuntimeError, match="the config changed after it was resolved .*lr: 1.0"):
        check_config_unchanged(run)
