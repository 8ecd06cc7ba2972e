"""The tests part's pytest plugin (pytest -p bench.gpu.plugin): each GPU test's dtype and outcome, written
to $STRATA_GPU_SUITE_TESTS_JSON for the suite's pass/fail counts per dtype."""
from __future__ import annotations

import json
import os
from pathlib import Path

_LABELS: dict[str, str] = {}
_OUTCOMES: dict[str, str] = {}


def pytest_collection_finish(session) -> None:
    for item in session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        dtype = str(params.get("dtype", ""))
        _LABELS[item.nodeid] = "bf16" if "bfloat16" in dtype or "autocast" in item.name else "fp32"


def pytest_runtest_logreport(report) -> None:
    if report.when == "call" or report.outcome != "passed":
        if _OUTCOMES.get(report.nodeid) in (None, "passed"):
            _OUTCOMES[report.nodeid] = report.outcome


def pytest_sessionfinish(session, exitstatus) -> None:
    path = os.environ.get("STRATA_GPU_SUITE_TESTS_JSON")
    if path:
        Path(path).write_text(json.dumps({"labels": _LABELS, "outcomes": _OUTCOMES, "exitstatus": int(exitstatus)}))
