"""Progress bars for long library loops, shown only when the CLI turns them on.

The library stays quiet by default (tests, Prefect workers); ``sparse-vggt`` enables rich progress bars on a
terminal. Library code wraps long loops in :func:`track`.
"""

from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_ENABLED = False


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
