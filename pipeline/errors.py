"""Errors the engine raises on purpose, each with enough context to act on."""

from __future__ import annotations


class SteleError(Exception):
    """Base class of stele's own errors (the CLI prints them without a traceback)."""


class SpecError(SteleError):
    """A pipeline that cannot run as written: the CLI prints ``file:line: field: message``, exits 2.

    ``file``/``line`` point at the YAML; for a ``--set`` override ``file`` is ``"--set"`` and the
    field is the override's key, since there is no line to point at.
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None):
        self.message, self.file, self.line, self.field = message, file, line, field
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file or "<pipeline>"
        if self.line is not None:
            where += f":{self.line}"
        field = f" {self.field}:" if self.field else ""
        return f"{where}:{field} {self.message}"


class StoreError(SteleError):
    """An artifact that is missing, ambiguous or damaged."""


class StageFailed(SteleError):
    """Raised inside a stage to fail it with a message and no traceback in the summary."""
