"""A small progress reporter for long loops (prepare, convert, evaluate) that never floods logs.

On an interactive terminal it redraws one stderr line (at most 10 times a second) and ends it
with a newline. Otherwise (a batch job's log file, a pipe, CI) it prints a plain line at most
once every ``interval`` seconds (30 by default) plus a final line only if it printed before: short
jobs print nothing, long ones a line per half minute. ``MEGATRON_SIMPO_PROGRESS=0`` turns it
off, ``=1`` forces the log-file style even on a terminal.

    for batch in progress(batches, "evaluate", unit="batch"):
        ...
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, TypeVar

T = TypeVar("T")


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 60}:{seconds % 60:02d}"
        if seconds < 3600
        else f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    )


class Progress:
    """Counts work done and reports it to ``stream`` (stderr) without flooding it.

    Args:
        desc: what is being done (first word of the line).
        total: the count when finished, if known (enables percent and ETA).
        unit: the name of one step.
        enabled: False makes every call a no-op (e.g. on all but one rank).
        interval: seconds between lines when ``stream`` is not a terminal.
        stream: where to write (default: ``sys.stderr`` at construction time).
    """

    def __init__(
        self,
        desc: str,
        total: int | None = None,
        unit: str = "it",
        *,
        enabled: bool = True,
        interval: float = 30.0,
        stream: IO[str] | None = None,
    ) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = stream if stream is not None else sys.stderr
        env = os.environ.get("MEGATRON_SIMPO_PROGRESS")
        self.enabled = enabled and env != "0"
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.tty = self.enabled and env != "1" and bool(isatty())
        self.interval = 0.1 if self.tty else interval
        self.n = 0
        self.start = time.monotonic()
        self._last = self.start
        self._printed = False
        self._closed = False

    def line(self) -> str:
        """The current status, e.g. ``evaluate 12/40 batch (30%) 0:04 elapsed, ETA 0:09``."""
        elapsed = time.monotonic() - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        text = f"{self.desc} {self.n}"
        if self.total:
            text += f"/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            text += f" {self.unit}"
        text += f" {_fmt_time(elapsed)} elapsed, {rate:.1f} {self.unit}/s"
        if self.total and 0 < self.n < self.total and rate > 0:
            text += f", ETA {_fmt_time((self.total - self.n) / rate)}"
        return text

    def update(self, n: int = 1) -> None:
        """Records ``n`` more steps; writes a line if the interval has passed."""
        self.n += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._write(self.line())

    def _write(self, text: str, end: bool = False) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if end else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._printed = True

    def close(self) -> None:
        """Writes the final line (on a terminal, or if a line was already written)."""
        if self._closed or not self.enabled:
            return
        self._closed = True
        if self.tty or self._printed:
            self._write(self.line() + " done", end=True)

    def wrap(self, fn: Callable[..., T]) -> Callable[..., T]:
        """``fn`` that counts one step per call (for work driven by a library callback)."""

        def counted(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.update()
            return out

        return counted

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(
    items: Iterable[T],
    desc: str,
    total: int | None = None,
    unit: str = "it",
    *,
    enabled: bool = True,
    interval: float = 30.0,
    stream: IO[str] | None = None,
) -> Iterator[T]:
    """Yields ``items`` while reporting progress (``total`` defaults to ``len(items)``)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(desc, total, unit, enabled=enabled, interval=interval, stream=stream) as bar:
        for item in items:
            yield item
            bar.update()
