"""Live per-stage status on the driver's console, and progress bars for work inside stages.

Stages run in Ray worker processes, so their progress travels to the driver through a small actor
(:class:`ProgressHub`, no CPUs) that ``StageContext.progress`` updates and the driver polls.
On a terminal the display is a live table; elsewhere (CI, a log file) it prints one line per change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

STYLES = {"pending": "dim", "waiting": "dim", "running": "bold cyan", "cached": "green",
          "ran": "bold green", "failed": "bold red", "skipped": "yellow", "excluded": "dim"}
SYMBOLS = {"pending": "·", "waiting": "·", "running": "▶", "cached": "≡", "ran": "✔",
           "failed": "✖", "skipped": "↷", "excluded": " "}


class _Hub:
    """Collects ``(desc, done, total)`` per stage; lives in a zero-CPU Ray actor."""

    def __init__(self) -> None:
        self.state: dict[str, tuple[str, int, int | None]] = {}

    def update(self, stage: str, desc: str, done: int, total: int | None) -> None:
        self.state[stage] = (desc, done, total)

    def snapshot(self) -> dict[str, tuple[str, int, int | None]]:
        return dict(self.state)


def start_progress_hub() -> Any:
    import ray

    return ray.remote(num_cpus=0)(_Hub).remote()


@dataclass
class Row:
    name: str
    type: str
    status: str = "pending"
    started: float | None = None
    wall_s: float | None = None
    note: str = ""
    progress: tuple[str, int, int | None] | None = None


class RunDisplay:
    def __init__(self, rows: dict[str, Row], console: Console | None = None, live: bool | None = None):
        self.rows = rows
        self.console = console or Console(emoji=False)
        self.live_enabled = self.console.is_terminal if live is None else live
        self._live: Live | None = None

    def __enter__(self) -> "RunDisplay":
        if self.live_enabled:
            self._live = Live(self._table(), console=self.console, refresh_per_second=4,
                              transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.update(self._table())
            self._live.__exit__(*exc)

    def set(self, name: str, status: str, note: str = "", wall_s: float | None = None) -> None:
        row = self.rows[name]
        if status == "running":
            row.started = time.monotonic()
        row.status, row.note = status, note
        if wall_s is not None:
            row.wall_s = wall_s
        if not self.live_enabled:
            timing = f" ({row.wall_s:.2f} s)" if row.wall_s is not None else ""
            extra = f": {note}" if note else ""
            self.console.print(f"{SYMBOLS[status]} {name} [{row.type}] {status}{timing}{extra}",
                               style=STYLES[status], highlight=False, markup=False, emoji=False)
        self.refresh()

    def progress(self, snapshot: dict[str, tuple[str, int, int | None]]) -> None:
        for name, p in snapshot.items():
            if name in self.rows:
                self.rows[name].progress = p
        self.refresh()

    def refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._table())

    def _table(self) -> Table:
        t = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
        for col in ("", "stage", "type", "status", "time", "progress"):
            t.add_column(col)
        now = time.monotonic()
        for r in self.rows.values():
            if r.status == "excluded":
                continue
            secs = r.wall_s if r.wall_s is not None else (
                now - r.started if r.status == "running" and r.started else None)
            prog: Any = Text(r.note, style="red" if r.status == "failed" else "dim")
            if r.status == "running" and r.progress:
                desc, done, total = r.progress
                bar = ProgressBar(total=total or None, completed=done, width=24)
                label = f" {desc} {done}/{total}" if total else f" {desc} {done}"
                prog = Table.grid()
                prog.add_row(bar, Text(label))
            t.add_row(Text(SYMBOLS[r.status], style=STYLES[r.status]), r.name, Text(r.type, "dim"),
                      Text(r.status, style=STYLES[r.status]),
                      f"{secs:.1f}s" if secs is not None else "", prog)
        return t
