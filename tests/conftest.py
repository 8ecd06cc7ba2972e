"""What every test run gets: the collective trace of every process the tests start, checked after each test
(tests/collective_trace), and the releases a run tested: the last lines of every pytest run name the version of
each dependency whose range pyproject.toml states, so a CI log says which versions passed (.ci/run runs the
newest allowed and the oldest, .ci/oldest.txt)."""
import importlib.metadata
import os
import sys

import pytest

from tests.collective_trace import TraceRoot, environment as collective_trace_environment

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


@pytest.fixture(scope="session", autouse=True)
def collective_trace(tmp_path_factory):
    """Every process the tests start records its collectives (tests/collective_trace); session-wide, so that
    the jobs of module- and session-scoped fixtures are traced too."""
    root = tmp_path_factory.mktemp("collective-trace")
    variables = collective_trace_environment(root, os.environ)
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    yield TraceRoot(root)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def ranks_agree(collective_trace):
    """After each test, the jobs that appeared since the last one: the ranks of each made the same collectives."""
    yield
    disagreements = collective_trace.disagreements()
    if disagreements:
        pytest.fail("\n\n".join(disagreements), pytrace=False)
