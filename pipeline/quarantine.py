"""Where unusable input goes: counted by reason, with the first examples kept for the manifest.

Every reader in stele (graph sources, document readers, media datasets, feature stages) reports
each unusable item here with where it came from (``file:line``, a row, an item id) and why. With
``on_error: raise`` the first one stops the stage with that message; with ``on_error: skip`` items are
counted and the first ones kept. Nothing is dropped without a record.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import StageFailed


class Quarantine:
    """Collects unusable items of one reader: raise on the first, or count and keep a sample."""

    KEEP = 20
    error: type[StageFailed] = StageFailed  # what ``on_error: raise`` raises; readers may narrow it

    def __init__(self, source: str, on_error: str = "raise",
                 sink: Callable[[str, str, str], None] | None = None):
        """``sink(where, reason, text)``, when given, receives every skipped item (not only the
        first :attr:`KEEP`), for stages that list all of them in a table."""
        self.source, self.on_error, self.sink = source, on_error, sink
        self.count = 0
        self.by_reason: dict[str, int] = {}
        self.examples: list[dict[str, Any]] = []
        self._seen: set[tuple[str, str, str]] = set()

    def bad(self, where: str, reason: str, text: str = "") -> None:
        """Report one unusable item. ``where`` is ``file:line`` (or ``file`` / an item id).

        A reader may go over a file more than once (for entities, then for triples): the same
        ``(where, reason, text)`` is counted once.
        """
        if (where, reason, text) in self._seen:
            return
        self._seen.add((where, reason, text))
        msg = f"{where}: {reason}" + (f": {text[:200]!r}" if text else "")
        if self.on_error == "raise":
            raise self.error(f"source {self.source!r}: {msg} (set on_error: skip to quarantine such "
                             f"items and keep going)")
        self.count += 1
        if self.sink is not None:
            self.sink(where, reason, text)
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        if len(self.examples) < self.KEEP:
            self.examples.append({"where": where, "reason": reason, "text": text[:200]})

    def summary(self) -> dict[str, Any]:
        return {"count": self.count, "by_reason": self.by_reason, "examples": self.examples}
