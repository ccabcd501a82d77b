"""The progress bar of ``tapestry aggregate``: bytes read and throughput, on rank 0's terminal."""

from __future__ import annotations

import sys

class Progress:
    """A rich progress bar of bytes read and throughput (rank 0, on a terminal only)."""

    def __init__(self, enabled: bool, total: int, *, per_coordinate: bool, world: int):
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TransferSpeedColumn)
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                TimeElapsedColumn(), console=Console(stderr=True), transient=False)
            what = "reading" if per_coordinate else "reading (several passes)"
            self.task = self.bar.add_task(f"{what}" + (f" [rank 0 of {world}]" if world > 1 else ""),
                                          total=total if per_coordinate else None)

    def advance(self, nbytes: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, nbytes)

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False
