"""A progress bar for long commands: on stderr when it is a terminal, silent otherwise.

Shared by the commands that run for seconds to minutes (``desk issue``, ``desk
import-meters``, ``as import-desk``, ``meters sim``), so that a pipe or ``--json`` output never
carries it and an operator at a terminal sees work move.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

__all__ = ["progress"]


@contextlib.contextmanager
def progress(enabled: bool, label: str) -> Iterator[Callable[[int, int], None]]:
    """Yields ``tick(done, total)``; a no-op unless ``enabled`` and stderr is a terminal."""
    if not (enabled and sys.stderr.isatty()):
        yield lambda done, total: None
        return
    from rich.console import Console  # loaded only for a terminal
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
