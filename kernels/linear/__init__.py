"""See cpu.py; ops.py is the dispatch point."""
