"""A one-line progress display on stderr, so stdout stays machine-readable."""

from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total: int, label: str = "items", stream=None, min_interval: float = 0.2):
        self.total, self.label = total, label
        self.stream = stream or sys.stderr
        self.done = self.tokens = 0
        self.started = time.monotonic()
        self._last_draw = 0.0
        self.min_interval = min_interval

    def update(self, items: int = 0, tokens: int = 0) -> None:
        self.done += items
        self.tokens += tokens
        now = time.monotonic()
        if now - self._last_draw >= self.min_interval or self.done >= self.total:
            self._last_draw = now
            self.stream.write("\r" + self.line(now) + "\x1b[K")
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.started, 1e-9)
        width = 24
        filled = int(width * self.done / self.total) if self.total else width
        parts = [f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {self.label}"]
        if self.tokens:
            parts.append(f"{self.tokens / elapsed:,.1f} tok/s")
        if 0 < self.done < self.total:
            parts.append(f"ETA {_duration(elapsed * (self.total - self.done) / self.done)}")
        else:
            parts.append(f"elapsed {_duration(elapsed)}")
        return "  ".join(parts)

    def close(self) -> None:
        if self.done < self.total or not self._last_draw:
            self.stream.write("\r" + self.line() + "\x1b[K")
        self.stream.write("\n")
        self.stream.flush()
