"""Progress bars for long library loops, shown only when the CLI turns them on.

The library stays quiet by default (tests, Prefect workers); ``sparse-vggt`` enables rich progress bars on a
terminal. Library code wraps long loops in :func:`track`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Iterable, Iterator, TypeVar

T = TypeVar("T")
_ENABLED = False
log = logging.getLogger(__name__)
LAYER_LOG_EVERY_S = 15.0  # a long forward logs its progress at most this often


def enable(flag: bool = True) -> None:
    global _ENABLED
    _ENABLED = flag


def track(items: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
    if not _ENABLED:
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), transient=False,
    ) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)


@contextlib.contextmanager
def layer_progress(model: Any, description: str, every_s: float | None = None) -> Iterator[None]:
    """Progress of one long forward, counted in the aggregator's steps (patch-embedding chunks, then each frame
    and global layer; see ``Aggregator.progress_listeners``): a bar on a terminal, and an INFO line at most every
    ``every_s`` seconds elsewhere (Prefect logs). Observes only, so outputs are unchanged."""
    listeners = getattr(getattr(model, "aggregator", None), "progress_listeners", None)
    if listeners is None:
        yield
        return
    every = LAYER_LOG_EVERY_S if every_s is None else every_s
    t0 = time.perf_counter()
    state = {"logged": t0}
    bar = task = None
    if _ENABLED:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), transient=True)
        task = bar.add_task(f"{description}: layers", total=None)
        bar.start()

    def listener(done: int, total: int) -> None:
        now = time.perf_counter()
        if bar is not None:
            bar.update(task, completed=done, total=total)
        elif now - state["logged"] >= every:
            state["logged"] = now
            log.info("%s: layer %d/%d after %.0f s", description, done, total, now - t0)

    listeners.append(listener)
    try:
        yield
    finally:
        listeners.remove(listener)
        if bar is not None:
            bar.stop()