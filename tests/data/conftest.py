"""Session fixtures: one tiny tokenizer and one small prepared corpus shared by the data tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for data_helpers, whichever way pytest was invoked

from data_helpers import make_documents, prepared_config, write_text_files  # noqa: E402

from strata.data.tokenizer import train_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> str:
    """A 400-piece tokenizer trained once on the test vocabulary."""
    path = tmp_path_factory.mktemp("tok") / "tiny.model"
    lines = [line for doc in make_documents(80, seed=99) for line in doc.split("\n") if line]
    train_tokenizer(lines, 400, path)
    return str(path)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, tokenizer_path):
    """(config, documents): 120 documents in several shards, 10% held out."""
    base = tmp_path_factory.mktemp("small")
    docs = make_documents(120, seed=1)
    src = write_text_files(base / "src", docs)
    return prepared_config(base / "prepared", [str(src)], tokenizer_path), docs
