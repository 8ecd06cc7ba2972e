"""Imported by Python at the start of every process whose PYTHONPATH holds this folder: the ranks that the
tests start (tests/collective_trace/__init__.py). It records their collectives when the test asked for it
(STRATA_TEST_COLLECTIVE_TRACE set) and does nothing otherwise; no product code knows of it."""
import strata_collective_recorder

strata_collective_recorder.install_when_enabled()
