"""Progress lines for slow steps: nothing for a step that ends within two seconds, then a line per update at most
every second, with the elapsed time, and a closing line.

    with progress.step("merge 'lora' on bnb", total=len(layers)) as report:
        for name in layers:
            ...
            report.advance(name)

A step whose work gives no updates (a library's own quantizer, a save) passes ``heartbeat=True``: a line every five
seconds says it is still running.

Lines go to stderr (``qadapt: merge 'lora' on bnb: 7/14 model.layers.3.mlp.up_proj (2.4 s)``).
``QADAPT_PROGRESS=0`` turns them off; ``QADAPT_PROGRESS=1`` prints every step, however short.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager

#: a step is quiet until it has run this long
AFTER_SECONDS = 2.0
#: at most one line per this many seconds
EVERY_SECONDS = 1.0
#: a heartbeat line every this many seconds
HEARTBEAT_SECONDS = 5.0


def _mode() -> str:
    value = os.environ.get("QADAPT_PROGRESS", "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return "off"
    if value in ("1", "true", "yes", "on", "all"):
        return "all"
    return "slow"


class Step:
    """One slow step; :meth:`advance` after each unit of work."""

    def __init__(self, what: str, total: int | None, stream) -> None:
        self.what, self.total, self.stream = what, total, stream
        self.done = 0
        self.started = time.monotonic()
        self.last_line = None
        self.mode = _mode()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _due(self) -> bool:
        if self.mode == "off":
            return False
        now = self.elapsed()
        if self.mode == "slow" and now < AFTER_SECONDS:
            return False
        return self.last_line is None or now - self.last_line >= EVERY_SECONDS or self.mode == "all"

    def _write(self, text: str) -> None:
        self.last_line = self.elapsed()
        try:
            print(f"qadapt: {self.what}: {text} ({self.elapsed():.1f} s)", file=self.stream, flush=True)
        except Exception:  # a closed or broken stream never breaks the work
            pass

    def advance(self, detail: str = "", count: int = 1) -> None:
        self.done += count
        if self._due():
            of = f"/{self.total}" if self.total else ""
            self._write(f"{self.done}{of} {detail}".rstrip())

    def beat(self, stop: threading.Event) -> None:
        """Heartbeat lines until ``stop`` is set (run in a daemon thread)."""
        if self.mode == "off" or stop.wait(AFTER_SECONDS):
            return
        while not stop.is_set():
            self._write("still running")
            if stop.wait(HEARTBEAT_SECONDS):
                return

    def finish(self) -> None:
        if self.last_line is not None or (self.mode == "all") or (self.mode == "slow" and self.elapsed() >= AFTER_SECONDS):
            if self.mode != "off":
                self._write("done")


@contextmanager
def step(what: str, total: int | None = None, stream=None, heartbeat: bool = False):
    """A slow step named ``what`` (``total`` units if known): see the module docstring."""
    current = Step(what, total, stream or sys.stderr)
    stop = threading.Event()
    beating = threading.Thread(target=current.beat, args=(stop,), daemon=True) if heartbeat else None
    if beating is not None:
        beating.start()
    try:
        yield current
    finally:
        stop.set()
        if beating is not None:
            beating.join()
    current.finish()
