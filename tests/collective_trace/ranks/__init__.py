"""What the ranks of a traced test load: this folder goes on their PYTHONPATH (tests/collective_trace/__init__.py)."""
