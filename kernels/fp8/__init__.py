"""See scaled.py (the GEMMs through torch._scaled_mm) and reference.py (its float64 emulation);
ops.linear is the dispatch point."""
