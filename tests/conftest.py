"""The releases a run tested: the last lines of every pytest run name the version of each dependency whose
range pyproject.toml states, so a CI log says which versions passed (.ci/run runs the newest allowed and the
oldest, .ci/oldest.txt)."""
import importlib.metadata
import sys

TESTED = ("torch", "transformers", "deepspeed", "megatron-core", "triton", "sentencepiece", "tensorboard",
          "safetensors", "numpy", "pyarrow", "tokenizers", "kernels")


def installed_versions() -> str:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    python = ".".join(map(str, sys.version_info[:3]))
    return ", ".join([f"python {python}", *(f"{name} {version(name)}" for name in TESTED)])


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"tested with: {installed_versions()}")
