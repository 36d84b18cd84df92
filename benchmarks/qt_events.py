"""Driving a Qt event loop from a benchmark script (no torch import here: the napari benchmarks time that import)."""
from __future__ import annotations

import time
from typing import Any, Callable, Optional


def pump_events(app: Any, until: Optional[Callable[[], bool]] = None, seconds: Optional[float] = None,
                limit: float = 300.0, poll_s: float = 0.005) -> None:
    """Process ``app``'s events until ``until()`` is true or ``seconds`` have passed; exit the script after
    ``limit`` seconds (a hung run must not hang the benchmark)."""
    start = time.perf_counter()
    while True:
        app.processEvents()
        time.sleep(poll_s)
        if until is not None and until():
            return
        if seconds is not None and time.perf_counter() - start >= seconds:
            return
        if time.perf_counter() - start > limit:
            raise SystemExit("timed out")
