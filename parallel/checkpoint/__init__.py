"""A checkpoint's life: its files and how they are written and verified (files.py, the one module that
spells DeepSpeed's file names), how a run resumes (resume.py), reading any layout's files and resharding
them (reshard.py), one state dict for the single-process readers (consolidate.py), and the engine
rebuilt with its optimizer state carried over (rebuild.py).

May import: everything else in strata.parallel (it is the top of the package), strata.model,
strata.kernels. Nothing in strata.parallel imports it back, except the launcher above both.
"""
