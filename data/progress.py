"""Progress of long data jobs: a tqdm bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("strata.data")
LOG_EVERY_S = 10.0


class Progress:
    """Counts input bytes (the bar's total) and tokens (shown as tokens/s)."""

    def __init__(self, total_bytes: int, label: str) -> None:
        self.total_bytes, self.label = total_bytes, label
        self.bytes = self.tokens = 0
        self.started = self.last_log = time.perf_counter()
        self.bar = (tqdm(total=total_bytes, unit="B", unit_scale=True, desc=label, dynamic_ncols=True)
                    if sys.stderr.isatty() else None)

    def tokens_per_s(self) -> float:
        return self.tokens / max(time.perf_counter() - self.started, 1e-9)

    def update(self, nbytes: int, ntokens: int) -> None:
        self.bytes += nbytes
        self.tokens += ntokens
        if self.bar is not None:
            self.bar.update(nbytes)
            self.bar.set_postfix_str(f"{self.tokens_per_s():,.0f} tok/s")
        elif time.perf_counter() - self.last_log >= LOG_EVERY_S:
            self.last_log = time.perf_counter()
            self._log_line()

    def _log_line(self) -> None:
        pct = 100.0 * self.bytes / max(self.total_bytes, 1)
        log.info("%s: %.0f%% (%d/%d bytes), %d tokens, %.0f tok/s", self.label, pct, self.bytes,
                 self.total_bytes, self.tokens, self.tokens_per_s())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.bytes:
            self._log_line()
