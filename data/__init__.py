"""Strata's data pipeline: prepare token shards, open them, and stream training batches.

Exports are resolved lazily (PEP 562) so that importing ``data`` (e.g. in prepare's spawned
worker processes) does not import torch unless the loader is actually used.
"""

from importlib import import_module

_EXPORTS = {
    "DataConfig": "config", "DataError": "errors", "Tokenizer": "tokenizer",
    "install_run_tokenizer": "tokenizer", "run_tokenizer_path": "tokenizer",
    "prepare_corpus": "prepare", "ensure_prepared": "prepare", "open_corpus": "corpus",
    "Corpus": "corpus", "TrainLoader": "loader", "eval_batches": "loader",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
