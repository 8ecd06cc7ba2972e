"""Progress of long data jobs: a tqdm bar on a terminal, plain log lines otherwise (every
LOG_EVERY_S seconds and at the end), both with files, MB, tokens, tokens/s and the time left."""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter

from tqdm import tqdm

log = logging.getLogger("strata.data")
LOG_EVERY_S = 10.0


class Progress:
    """Counts input bytes (the bar's total), finished input files and tokens."""

    def __init__(self, total_bytes: int, label: str, files: Counter | None = None) -> None:
        """files: how many pieces of work each input file is cut into; a file counts as done when
        all of its pieces are."""
        self.total_bytes, self.label = total_bytes, label
        self.pieces_left = Counter(files or {})
        self.total_files, self.files = len(self.pieces_left), 0
        self.bytes = self.tokens = 0
        self.started = self.last_log = time.perf_counter()
        self.bar = (tqdm(total=total_bytes, unit="B", unit_scale=True, desc=label, dynamic_ncols=True)
                    if sys.stderr.isatty() else None)

    def tokens_per_s(self) -> float:
        return self.tokens / max(time.perf_counter() - self.started, 1e-9)

    def eta_s(self) -> float | None:
        """Seconds left at the bytes-per-second so far; None before anything is done."""
        if not self.bytes:
            return None
        elapsed = time.perf_counter() - self.started
        return elapsed * (self.total_bytes - self.bytes) / self.bytes

    def update(self, nbytes: int, ntokens: int, files: list[str] = ()) -> None:
        """One piece of work done: its input bytes, tokens and the files it read from."""
        self.bytes += nbytes
        self.tokens += ntokens
        for name in files:
            self.pieces_left[name] -= 1
            self.files += self.pieces_left[name] == 0
        if self.bar is not None:
            self.bar.update(nbytes)
            self.bar.set_postfix_str(f"{self.files}/{self.total_files} files, {self.tokens:,} tokens, "
                                     f"{self.tokens_per_s():,.0f} tok/s")
        elif time.perf_counter() - self.last_log >= LOG_EVERY_S:
            self.last_log = time.perf_counter()
            log.info("%s", self.line())

    def line(self) -> str:
        eta = self.eta_s()
        left = "" if eta is None else f", {format_seconds(eta)} left"
        return (f"{self.label}: {self.files}/{self.total_files} files, {self.bytes / 2**20:.1f}/"
                f"{self.total_bytes / 2**20:.1f} MB ({100.0 * self.bytes / max(self.total_bytes, 1):.0f}%), "
                f"{self.tokens:,} tokens, {self.tokens_per_s():,.0f} tok/s{left}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.bytes:
            log.info("%s", self.line())


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
