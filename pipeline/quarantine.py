"""Where unusable input goes: counted by reason, with the first examples kept for the manifest.

Every reader in stele (graph sources, document readers, media datasets, feature stages) reports
each unusable item here with where it came from (``file:line``, a row, an item id) and why. With
``on_error: raise`` the first one stops the stage with that message; with ``on_error: skip`` items are
counted and the first ones kept. Nothing is dropped without a record.

Reasons are what items are counted by, so a reason says what kind of problem an item has, the same
way on every run: :func:`describe` turns an exception into one, and :meth:`Quarantine.bad` takes the
memory addresses out of object reprs (``<Foo object at 0x7f...>``) that reach a reason anyway.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from .errors import StageFailed

# The address in a default repr (``<x.Foo object at 0x7f3a...>``, PIL's ``<... size=2x2 at 0x7F...>``):
# it differs from run to run, so a reason holding it would be a new reason on every run.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+(?=>)")
_BREAKS = re.compile(r"\s*[\r\n]+\s*")


def stable_reason(reason: str) -> str:
    """``reason`` on one line and without the memory addresses of object reprs."""
    return _ADDRESS.sub("", _BREAKS.sub(" ", reason.strip()))


def describe(exc: BaseException) -> str:
    """An exception as the detail of a quarantine reason: its message, made stable
    (:func:`stable_reason`), or its type's name when it has none.

    Some messages say little on their own and are spelled out: a ``KeyError`` is only the key
    (``'mainsnak'``); a JSON error parsed from one line would name "line 1" whatever line of the
    file it was; a decoding error is worded as :mod:`pipeline.readers` words it.
    """
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        msg = f"missing key {exc.args[0]!r}"
    elif isinstance(exc, json.JSONDecodeError):
        msg = f"{exc.msg} at column {exc.colno}" if exc.lineno == 1 else \
            f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    elif isinstance(exc, UnicodeDecodeError):
        msg = f"undecodable bytes ({exc.reason} at byte {exc.start})"
    else:
        msg = str(exc)
    return stable_reason(msg) or type(exc).__name__


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
        ``(where, reason, text)`` is counted once. ``reason`` is stored as :func:`stable_reason`
        gives it, so that items are counted by the same reasons on every run.
        """
        reason = stable_reason(reason)
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
