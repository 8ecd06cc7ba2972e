"""What a fresh install gives a user: one import namespace, `strata`, over the repository's folders, that
shares no import name with any other package. transformers (5.25 and newer) needs Hugging Face's
`kernels` package; a process that holds Strata and transformers' NemotronH, Bamba and Mamba2 must get
each its own, in either order of import, from the repository root (which Python puts first on
sys.path) and from anywhere else."""
import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("launcher", "model", "parallel", "data", "kernels")


def listed_packages() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def package_folders() -> list[str]:
    """Every folder under the five that holds Python modules, as the dotted name it installs under."""
    found = {"strata"}
    for top in FOLDERS:
        for module in (REPO / top).rglob("*.py"):
            found.add("strata." + ".".join(module.parent.relative_to(REPO).parts))
    return sorted(found)


def test_pyproject_lists_every_folder_and_the_folders_are_no_top_level_packages():
    assert sorted(listed_packages()) == package_folders()
    for top in FOLDERS:  # an __init__.py here would make `import kernels` from the root take ours
        assert not (REPO / top / "__init__.py").exists(), top
    for name in package_folders():
        folder = REPO.joinpath(*name.split(".")[1:])
        if folder.name not in FOLDERS and name != "strata":
            assert (folder / "__init__.py").is_file(), f"{folder} is a sub-package without __init__.py"


def test_the_wheel_holds_the_strata_namespace_only(tmp_path):
    source = tmp_path / "source"  # a copy: pip builds in the tree it is given, and leaves build/ there
    for folder in FOLDERS:
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("strata-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"strata"}
    modules = {str(p.relative_to(REPO)) for top in FOLDERS for p in (REPO / top).rglob("*.py")}
    assert {n.removeprefix("strata/") for n in names if n.endswith(".py")} == modules
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "strata = strata.launcher.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


# One process, both libraries: transformers' three hybrids and its hub-kernels integration (which imports
# Hugging Face's `kernels`), Strata's model and kernels; each computes, then says where its modules came from.
ONE_PROCESS = r'''
import sys
import torch

def transformers_side():
    import importlib.util
    import transformers
    from transformers.integrations import hub_kernels  # imports Hugging Face's kernels where it is installed
    torch.manual_seed(0)
    shared = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=48)
    configs = {
        "NemotronH": transformers.NemotronHConfig(**shared, n_groups=1, ssm_state_size=16, mamba_num_heads=2,
                                                  mamba_head_dim=16, head_dim=16, chunk_size=8,
                                                  hybrid_override_pattern="M*"),
        "Bamba": transformers.BambaConfig(**shared, mamba_n_groups=1, mamba_d_state=16, mamba_n_heads=2,
                                          mamba_d_head=16, mamba_expand=1, mamba_chunk_size=8, attn_layer_indices=[1]),
        "Mamba2": transformers.Mamba2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=2,
                                            head_dim=16, n_groups=1, state_size=16, expand=1, chunk_size=8),
    }
    ids = torch.randint(0, 64, (1, 11))
    for name, config in configs.items():
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():
            assert torch.isfinite(model(ids).logits).all(), name
    spec = importlib.util.find_spec("kernels")  # what `import kernels` gives this process
    return (spec.origin if spec and spec.origin else "namespace"), hub_kernels.__name__

def strata_side():
    from strata.kernels import ops
    from strata.model.config import ModelConfig
    from strata.model.hybrid import HybridLM
    model = HybridLM(ModelConfig(pattern="M*-", d_model=32, vocab_size=64)).eval()
    ids = torch.randint(0, 64, (1, 11))
    with torch.no_grad():
        assert torch.isfinite(model(ids)).all()
    return ops.__file__

sides = {"transformers": transformers_side, "strata": strata_side}
results = {name: sides[name]() for name in sys.argv[1:]}
print(results["transformers"][0])
print(results["strata"])
'''


@pytest.mark.parametrize("where", ["repository root", "elsewhere"])
@pytest.mark.parametrize("order", [["transformers", "strata"], ["strata", "transformers"]])
def test_transformers_hybrids_and_strata_share_a_process(tmp_path, where, order):
    pytest.importorskip("transformers")
    cwd = REPO if where == "repository root" else tmp_path
    # `python -c` puts the working directory first on sys.path, as `python -m`, torchrun and pytest do
    proc = subprocess.run([sys.executable, "-c", ONE_PROCESS, *order], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels, strata_ops = proc.stdout.split()[-2:]
    assert Path(strata_ops).resolve() == REPO / "kernels" / "ops.py"
    assert kernels == hugging_faces_kernels()


def hugging_faces_kernels() -> str:
    """Where `import kernels` must lead: Hugging Face's package where it is installed (transformers 5.25 and
    later need it), else at most a namespace portion, never a package of ours."""
    try:
        return str(Path(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")).resolve())
    except importlib.metadata.PackageNotFoundError:
        return "namespace"


def test_pytest_itself_sees_hugging_faces_kernels():
    spec = importlib.util.find_spec("kernels")  # this process runs from the repository root, the root on sys.path
    assert (str(Path(spec.origin).resolve()) if spec and spec.origin else "namespace") == hugging_faces_kernels()
    from strata.kernels import ops

    assert Path(ops.__file__).resolve() == REPO / "kernels" / "ops.py"
