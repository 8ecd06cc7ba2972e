"""The one config schema: dataclasses from each folder, composed here, loaded from YAML.

    cfg = load_config("configs/tiny.yaml", ["train.max_steps=50", "model.d_model=512"])

Unknown keys, wrong types and impossible values raise ConfigError, whose message is
one line naming the key and the nearest valid one; the CLI prints it and exits 2.

Every field's docstring (the string right under it) is its documentation: `describe_keys()` reads
them from the source and lists every key with its type and default (`strata train --help`,
`strata config --keys`).
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import keyword
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from strata.data.config import DataConfig
from strata.kernels.fp8.recipe import RECIPES as FP8_RECIPES
from strata.model.config import BLOCK_KINDS, BlockSpec, ModelConfig
from strata.parallel.config import RECOMPUTE_MODES, CheckpointConfig, OptimizerConfig, ParallelConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny.yaml"


class ConfigError(ValueError):
    """A config problem; str() is one line naming the key and the fix."""


class YamlBool(str):
    """A plain YAML 1.1 boolean word (yes/no/on/off/true/false, any case) as it was written.

    YAML reads ``verify: off`` as false; the config loader keeps the spelling instead, and
    ``coerce`` decides by the field's type: a bool field gets the truth value, a str field the
    word itself (``"off"``), and untyped values (dicts, Any) the bool YAML would have given.
    """

    @property
    def truth(self) -> bool:
        return self.lower() in ("yes", "true", "on")


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader, except that boolean words stay YamlBool strings (see coerce)."""


_Loader.add_constructor("tag:yaml.org,2002:bool", lambda loader, node: YamlBool(loader.construct_scalar(node)))


def parse_yaml(text: str):
    """YAML as the config reads it, config files and dotted overrides alike."""
    return yaml.load(text, Loader=_Loader)


@dataclass
class TrainConfig:
    run_dir: str = "runs/tiny"
    """Directory of the run: checkpoints, TensorBoard events, the resolved config."""
    seed: int = 1234
    """Seed of the model's initialisation and of the data order."""
    max_steps: int = 300
    """Optimizer steps to train for."""
    seq_len: int = 256
    """Tokens per training sequence."""
    global_batch_size: int = 16
    """Sequences per optimizer step over all data-parallel ranks
    (= parallel.micro_batch_size x gradient accumulation x data-parallel size)."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr."""
    warmup_steps: int = 30
    """Linear warmup steps from 0 to lr."""
    schedule: str = "cosine"
    """After warmup: 'cosine' decay to min_lr, or 'wsd' (warmup-stable-decay: constant, then a
    linear decay to min_lr over the last decay_fraction of the steps)."""
    decay_fraction: float = 0.2
    """WSD only: fraction of max_steps spent in the final decay."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on norms, biases, embeddings or SSM A/D/dt)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    eval_every: int = 100
    """Evaluate on held-out data every this many steps (and at the end); 0 only at the end."""
    eval_batches: int = 8
    """Held-out batches (of micro_batch_size sequences per rank) per evaluation."""
    precision: str = "auto"
    """'auto' (bf16 autocast on GPU, fp32 on CPU), 'bf16' or 'fp32'."""
    param_dtype: str = "fp32"
    """'fp32': fp32 parameters, matmuls in bf16 under autocast (precision). 'bf16': DeepSpeed's bf16
    mode: the model's parameters, gradients and ZeRO's gathers in bf16, the fp32 master weights and
    AdamW's state in ZeRO's partitions (half the weight memory, no per-matmul weight casts);
    gradients are still reduced in fp32. Needs parallel.zero_stage 1, 2 or 3 (the pipeline: 1)."""
    max_skipped_steps: int = 5
    """Consecutive steps with a non-finite loss or gradient (each skipped, never applied) after
    which the run stops with exit code 3, its last good checkpoint intact."""
    preempt_signal: str = "SIGUSR1"
    """A signal that, like SIGTERM and SIGINT, saves a checkpoint at the next step boundary and
    exits with code 75 (preempted); '' leaves it to its default action."""
    spike_zscore: float = 0.0
    """Loss-spike guard: a step loss this many standard deviations above the mean of the last
    spike_window steps is logged as a spike (train/loss_spike_z); 0 turns the guard off."""
    spike_window: int = 100
    """Steps of loss history the spike guard compares against (it judges after half of them)."""
    spike_skip: bool = False
    """With spike_zscore > 0: skip a step whose loss is a spike, as a non-finite one is (pp = 1 only)."""
    recompute: str = "none"
    """Activation recompute in the backward, for less activation memory: 'none'; 'selective'
    recomputes what is memory-heavy and FLOP-light and keeps the matmul outputs (Mamba2: conv, SSD
    scan and gated norm, keeping in_proj's output; attention: RoPE, GQA and SDPA, keeping q, k, v;
    MLP: the activation); 'full' recomputes whole blocks (see recompute_every), keeping their input."""
    recompute_every: int = 1
    """Full recompute only: of each block kind's blocks set to 'full', recompute every k-th (the
    k-th, 2k-th, ... of that kind in the pattern); the others keep everything."""
    recompute_kinds: dict[str, str] = field(default_factory=dict)
    """Per block kind, a recompute mode that overrides `recompute`, e.g. {M: full, '*': selective}
    or train.recompute_kinds.M=full ('M' Mamba2, '*' attention, '-' MLP)."""
    fp8: str = "none"
    """FP8 training of the big matmuls (Mamba2 in/out projections, attention q/k/v/o, MLP linears, the
    dense factors of structured MLPs) through torch._scaled_mm with dynamic current scaling:
    'none', 'tensorwise' (one scale per tensor, e5m2 gradients) or 'rowwise' (per-row scales, all
    e4m3), torchao's recipes (kernels/fp8/recipe.py). Master weights, optimizer, SSD/conv/norm and
    the LM head are unchanged; products whose sizes are not multiples of 16 stay bf16 (said at start)."""
    fp8_keep_bf16: int = 1
    """With fp8: this many first and as many last blocks stay bf16, as Nemotron-H's first and last
    layers did (0: every block in FP8). The LM head (the fused cross-entropy) always stays bf16."""

    def validate(self) -> None:
        for name in ("max_steps", "seq_len", "global_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"schedule: {self.schedule!r} is not one of 'cosine', 'wsd'")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision: {self.precision!r} is not one of 'auto', 'bf16', 'fp32'")
        if self.param_dtype not in ("fp32", "bf16"):
            raise ValueError(f"param_dtype: {self.param_dtype!r} is not one of 'fp32', 'bf16'")
        if self.param_dtype == "bf16" and self.precision == "fp32":
            raise ValueError("param_dtype: bf16 parameters compute in bf16, but precision is fp32; "
                             "set precision to bf16 (or auto), or param_dtype to fp32")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: must be within [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction: must be within (0, 1], got {self.decay_fraction}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.eval_every < 0 or self.eval_batches < 1:
            raise ValueError("warmup_steps/eval_every: must be >= 0 and eval_batches >= 1")
        if self.spike_zscore < 0 or self.spike_window < 2:
            raise ValueError(f"spike_zscore/spike_window: must be >= 0 and >= 2, got {self.spike_zscore}, "
                             f"{self.spike_window}")
        if self.max_skipped_steps < 1:
            raise ValueError(f"max_skipped_steps: must be >= 1, got {self.max_skipped_steps}")
        if self.preempt_signal not in ("", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT"):
            raise ValueError(f"preempt_signal: {self.preempt_signal!r} is not one of 'SIGUSR1', 'SIGUSR2', "
                             "'SIGHUP', 'SIGQUIT' or '' (SIGTERM and SIGINT always save)")
        self.validate_recompute()
        if self.fp8 not in ("none", *FP8_RECIPES):
            raise ValueError(f"fp8: {self.fp8!r} is not one of 'none', " + ", ".join(map(repr, FP8_RECIPES)))
        if self.fp8_keep_bf16 < 0:
            raise ValueError(f"fp8_keep_bf16: must be >= 0, got {self.fp8_keep_bf16}")

    def validate_recompute(self) -> None:
        modes = ", ".join(map(repr, RECOMPUTE_MODES))
        if self.recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute: {self.recompute!r} is not one of {modes}")
        kinds = self.recompute_kinds
        if not isinstance(kinds, dict):
            raise ValueError(f"recompute_kinds: expected a mapping of block kind to mode, e.g. {{M: full}}, "
                             f"got {kinds!r}")
        for kind, mode in kinds.items():
            if kind not in BLOCK_KINDS:
                raise ValueError(f"recompute_kinds: {kind!r} is not a block kind; use "
                                 + ", ".join(f"'{k}' ({v})" for k, v in BLOCK_KINDS.items()))
            if mode not in RECOMPUTE_MODES:
                raise ValueError(f"recompute_kinds.{kind}: {mode!r} is not one of {modes}")
        if self.recompute_every < 1:
            raise ValueError(f"recompute_every: must be >= 1, got {self.recompute_every}")
        if self.recompute_every > 1 and "full" not in (self.recompute, *kinds.values()):
            raise ValueError(f"recompute_every: {self.recompute_every} applies to full recompute only; set "
                             "train.recompute=full (or a kind to full in train.recompute_kinds) or leave it at 1")

    def computes_in_bf16(self, on_gpu: bool) -> bool:
        """Whether the matmuls run in bf16: bf16 parameters, or precision bf16 (auto: on a GPU)."""
        return self.param_dtype == "bf16" or self.precision == "bf16" or (self.precision == "auto" and on_gpu)

    def optimizer(self) -> OptimizerConfig:
        """What the engine reads of this section (parallel/engine/build.py), at its current values."""
        return OptimizerConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(OptimizerConfig)})

    def block_fp8(self, n_blocks: int) -> list[str | None]:
        """Each block's FP8 recipe (None: bf16; parallel/engine/parallelize.py applies it): fp8, except
        the first and last fp8_keep_bf16 blocks."""
        if self.fp8 == "none":
            return [None] * n_blocks
        keep = self.fp8_keep_bf16
        return [None if i < keep or i >= n_blocks - keep else self.fp8 for i in range(n_blocks)]

    def block_recompute(self, blocks: list[BlockSpec]) -> list[str]:
        """Each block's recompute mode (one of RECOMPUTE_MODES; parallel/engine/parallelize.py applies it),
        for ModelConfig.blocks(): recompute_kinds[its kind], else recompute; a 'full' block that is
        not one of its kind's every recompute_every-th 'full' blocks gets 'none'."""
        plan, fulls = [], dict.fromkeys(BLOCK_KINDS, 0)
        for block in blocks:
            mode = self.recompute_kinds.get(block.kind, self.recompute)
            if mode == "full":
                fulls[block.kind] += 1
                mode = "full" if fulls[block.kind] % self.recompute_every == 0 else "none"
            plan.append(mode)
        return plan


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard events under <run_dir>/tensorboard."""
    log_every: int = 10
    """Print and record training metrics every this many steps."""
    progress: str = "auto"
    """'auto' (a progress bar on a terminal, plain lines otherwise), 'bar' or 'lines'."""
    peak_tflops: float = 0.0
    """Peak dense bf16 TFLOP/s of one accelerator, the denominator of MFU; 0 looks the GPU up by
    name (H100/H200 989, A100 312) and leaves MFU out where it is unknown (e.g. on CPU)."""
    sample_prompt: str = "def "
    """After each evaluation, the greedy continuation of this prompt goes to the log and
    TensorBoard's text tab (tp = cp = pp = 1 and ZeRO <= 2: rank 0 holds the whole model); '' turns it off."""
    sample_tokens: int = 32
    """Tokens in that continuation."""

    def validate(self) -> None:
        if self.log_every < 1:
            raise ValueError(f"log_every: must be >= 1, got {self.log_every}")
        if self.peak_tflops < 0:
            raise ValueError(f"peak_tflops: must be >= 0, got {self.peak_tflops}")
        if self.progress not in ("auto", "bar", "lines"):
            raise ValueError(f"progress: {self.progress!r} is not one of 'auto', 'bar', 'lines'")
        if self.sample_tokens < 1:
            raise ValueError(f"sample_tokens: must be >= 1, got {self.sample_tokens}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model: layer pattern and block settings."""
    data: DataConfig = field(default_factory=DataConfig)
    """The corpus, tokenizer and loader."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimisation and the run directory."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """The parallel layout: TP, PP, ZeRO, micro-batch."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """When to save, how many to keep, whether to resume."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """TensorBoard and console output."""

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            try:
                getattr(self, f.name).validate()
            except ValueError as e:
                raise ConfigError(f"{f.name}.{e}") from None
        if self.train.param_dtype == "bf16" and self.parallel.zero_stage == 0:
            raise ConfigError("train.param_dtype: bf16 parameters keep their fp32 master weights in ZeRO's "
                              "partitions, and parallel.zero_stage is 0; set it to 1, 2 or 3 (1 with pp > 1), or "
                              "train.param_dtype=fp32")
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(f"train.seq_len: {self.train.seq_len} exceeds model.max_seq_len="
                              f"{self.model.max_seq_len}; lower seq_len or raise max_seq_len")
        if self.train.fp8 != "none" and self.parallel.cp > 1:
            raise ConfigError(f"train.fp8: {self.train.fp8} with parallel.cp={self.parallel.cp} is not supported yet: each "
                              "context-parallel rank would scale its shard's activations by its own maximum, not the "
                              "sequence's; use parallel.cp=1 or train.fp8=none")

    def planned_vocab_size(self) -> int:
        """model.vocab_size, else the vocabulary data.vocab_size will train when `strata prepare`
        trains the tokenizer (0: the tokenizer's, not known before it is read)."""
        if self.model.vocab_size:
            return self.model.vocab_size
        return 0 if self.data.tokenizer else self.data.vocab_size


def config_path(given: str | Path | None) -> Path:
    """The YAML a --config names, wherever the command runs: the path as given (absolute, or relative to
    the invoking directory) where that is a file, else the same relative path under the repository
    (`configs/tiny.yaml` from any directory), else a name in its configs/ (`hybrid-1b3` or
    `hybrid-1b3.yaml`). Absolute, so that what records it (a SLURM script) reads the same file."""
    if not given:
        return DEFAULT_CONFIG
    path = Path(given).expanduser()
    candidates = [path]
    if not path.is_absolute():
        candidates += [CONFIG_DIR.parent / path, CONFIG_DIR / path.name, CONFIG_DIR / f"{path.name}.yaml"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"config file {given} not found (looked in {Path.cwd()} and {CONFIG_DIR}); pass an "
                          f"existing YAML, or one of Strata's configs by name: {names}")
    return found.resolve()


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    path = config_path(path)
    try:
        raw = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, train, ...)")
    for item in overrides:
        apply_override(raw, item)
    cfg = build(Config, raw, prefix="")
    cfg.validate()
    return cfg


def load_run_config(ckpt: str | Path) -> Config:
    """The resolved Config a run saved beside its checkpoints: <run_dir>/config.yaml, where
    ckpt is <run_dir>/checkpoints/step_XXXXXXXX.

    Read from any directory: a data.tokenizer that does not resolve from here (a relative path of
    the directory training started in, a file since deleted) becomes the run directory's copy of
    the tokenizer (data/tokenizer.py: tokenizer.model, or tokenizer.json), or empty when there is none."""
    path = Path(ckpt).parent.parent / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"checkpoint {ckpt} has no {path}; the run's config.yaml must sit beside "
                          "its checkpoints/ directory")
    try:
        return load_config(path, _tokenizer_from_here(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _tokenizer_from_here(path: Path) -> list[str]:
    from strata.data.errors import DataError
    from strata.data.tokenizer import tokenizer_copy, tokenizer_files

    try:
        tokenizer = ((parse_yaml(path.read_text()) or {}).get("data") or {}).get("tokenizer")
    except (yaml.YAMLError, AttributeError):
        return []  # load_config says what is wrong
    if not isinstance(tokenizer, str) or not tokenizer:
        return []
    try:
        tokenizer_files(tokenizer)
        return []
    except DataError:  # not from here (or no longer a tokenizer): the run's copy
        return [f"data.tokenizer={tokenizer_copy(path.parent) or ''}"]


def apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not key=value; write e.g. train.max_steps=50")
    *parents, leaf = key.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {p} is not a section")
    try:
        node[leaf] = parse_yaml(value) if value != "" else ""
    except yaml.YAMLError:
        node[leaf] = value


def build(cls, raw, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    fields = {key_name(f.name): f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"unknown key {prefix}{key}{suggest(key, fields, prefix)}")
        kwargs[fields[key]] = coerce(hints[fields[key]], value, f"{prefix}{key}")
    return cls(**kwargs)


def key_name(field_name: str) -> str:
    """The key of a field: its name, except that a Python keyword, which no field can be named,
    is spelt with a trailing underscore in the dataclass (checkpoint.async is CheckpointConfig.async_)."""
    stem = field_name.removesuffix("_")
    return stem if stem != field_name and keyword.iskeyword(stem) else field_name


def suggest(key: str, fields, prefix: str) -> str:
    close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
    if close:
        return f"; did you mean {prefix}{close[0]}?"
    return f"; valid keys: {', '.join(prefix + f for f in fields)}"


def coerce(hint, value, key: str):
    """``value`` as read from YAML, checked against (and converted to) the field type ``hint``.

    The one place that knows types: a YAML boolean word is the string it spells for a str
    field (``data.verify: off``) and a bool for a bool field; everywhere else it is a bool.
    """
    if isinstance(value, YamlBool):
        if hint is str:
            return str(value)
        if hint is bool or hint is typing.Any or origin_is_dict(hint):
            return value.truth
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and str in typing.get_args(hint):
            return str(value)
        value = value.truth  # then checked like any bool: an int or float field refuses it
    elif isinstance(value, (dict, list)) and (hint is typing.Any or origin_is_dict(hint)):
        return plain(value)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, prefix=key + ".")
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        if not isinstance(value, list):
            value = [value] if isinstance(value, (str, int, float)) else value
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_hint, *_) = typing.get_args(hint) or (typing.Any,)
        return [coerce(item_hint, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return coerce(option, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not a {hint}")
    if hint is typing.Any or origin is dict or hint is dict:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint is type(None) and value is None:
        return None
    if isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{key}: expected {name}, got {type(value).__name__} {value!r}")


def origin_is_dict(hint) -> bool:
    return hint is dict or typing.get_origin(hint) is dict


def plain(value):
    """An untyped YAML value with every YamlBool turned into the bool YAML 1.1 means."""
    if isinstance(value, YamlBool):
        return value.truth
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def to_dict(cfg) -> dict:
    return _named_by_key(dataclasses.asdict(cfg))


def _named_by_key(value):
    if isinstance(value, dict):
        return {key_name(k) if isinstance(k, str) else k: _named_by_key(v) for k, v in value.items()}
    return value


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ----------------------------------------------------------------------------------------
# The keys, described: `strata train --help` and `strata config --keys`
# ----------------------------------------------------------------------------------------

@dataclass
class Key:
    """One config key as the listing shows it."""
    name: str
    """Dotted, as an override writes it: model.mamba.d_state."""
    type: str
    default: object
    """The value when a YAML leaves the key out."""
    doc: str


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """{field: its docstring} of a dataclass, read from its source: the string literal right under
    each annotated field, as every config dataclass writes them."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {node.target.id: inspect.cleandoc(after.value.value) for node, after in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)}


def sections(cls=Config, prefix: str = "", doc: str = "") -> list[tuple[str, str, list[Key]]]:
    """(section, its docstring, its own keys) in schema order, a nested section after its parent's
    keys: model, model.mamba, model.attention, model.mlp, data, train, ..."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    own, nested = [], []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            nested += sections(hint, f"{prefix}{f.name}.", docs.get(f.name, ""))
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        own.append(Key(prefix + key_name(f.name), type_name(hint), default, docs.get(f.name, "")))
    return ([(prefix.rstrip("."), doc, own)] if own else []) + nested


def type_name(hint) -> str:
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("typing.", "")


def yaml_value(value) -> str:
    """A value as YAML (and a dotted override) writes it: [stdlib], '', 1.0e-08, true."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30)
    return text.removesuffix("\n...\n").strip()


KEYS_HEADER = """config keys: sections of the YAML file, or dotted overrides on the command line
(train.max_steps=50). A default is what a key takes when the YAML leaves it out; the default
config, configs/tiny.yaml, sets some of them. `strata config [--config C] [overrides]` prints
what a run would use."""


def describe_keys(only: typing.Sequence[str] = (), width: int = 100) -> str:
    """Every key (or those under the sections / keys named in `only`) with its type, default
    and docstring, grouped by section; ConfigError names an unknown section or key."""
    groups = sections()
    names = [name for name, _, _ in groups] + [k.name for _, _, keys in groups for k in keys]
    for want in only:
        if want not in names and not any(n.startswith(want + ".") for n in names):
            raise ConfigError(f"unknown section or key {want}{suggest(want, names, '')}")

    def chosen(name: str) -> bool:
        return not only or any(name == w or name.startswith(w + ".") for w in only)

    lines = [KEYS_HEADER]
    for name, doc, keys in groups:
        keys = [k for k in keys if chosen(k.name) or chosen(name)]
        if not keys:
            continue
        lines += ["", f"{name}: {' '.join(doc.split())}".rstrip(": ")]
        for k in keys:
            lines.append(f"  {k.name}: {k.type} = {yaml_value(k.default)}")
            lines += textwrap.wrap(" ".join(k.doc.split()), width, initial_indent=" " * 6, subsequent_indent=" " * 6,
                                   break_long_words=False, break_on_hyphens=False)
    return "\n".join(lines)
