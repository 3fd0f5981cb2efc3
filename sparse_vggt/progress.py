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


def torch_module() -> type:
    from torch import nn

    return nn.Module


@contextlib.contextmanager
def layer_progress(model: Any, description: str, every_s: float | None = None) -> Iterator[None]:
    """Progress of one long forward, counted in transformer blocks (the patch-embedding backbone's, then
    ``model.aggregator.frame_blocks`` and ``global_blocks``) with forward hooks: a bar on a terminal, and an INFO line at most every ``every_s``
    seconds elsewhere (Prefect logs). Observes only: the hooks return nothing, so outputs are unchanged."""
    agg = getattr(model, "aggregator", None)
    patch = getattr(agg, "patch_embed", None)  # the DINOv2 backbone runs first (a quarter of a VGGT-1B forward)
    blocks = [b for b in (getattr(patch, "blocks", None) or []) if isinstance(b, torch_module())]
    blocks += [b for name in ("frame_blocks", "global_blocks") for b in (getattr(agg, name, None) or [])]
    if not blocks:
        yield
        return
    every = LAYER_LOG_EVERY_S if every_s is None else every_s
    total, t0 = len(blocks), time.perf_counter()
    state = {"done": 0, "logged": t0}
    bar = task = None
    if _ENABLED:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), transient=True)
        task = bar.add_task(f"{description}: layers", total=total)
        bar.start()

    def hook(module: Any, args: Any, output: Any) -> None:
        state["done"] += 1
        now = time.perf_counter()
        if bar is not None:
            bar.advance(task)
        elif now - state["logged"] >= every:
            state["logged"] = now
            log.info("%s: layer %d/%d after %.0f s", description, state["done"], total, now - t0)

    handles = [b.register_forward_hook(hook) for b in blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        if bar is not None:
            bar.stop()
