"""See reference.py; ops.py is the dispatch point."""
