"""The one line reader: text files line by line, what cannot be read goes to the quarantine.

Every reader of user text files (graph sources, documents, media datasets' caption files) goes
through :func:`read_lines`, so they all treat bytes the same way: local or on any fsspec URI
(:mod:`pipeline.uris`), UTF-8, gzip by the ``.gz`` suffix, a byte-order mark at the start of the
file dropped (spreadsheet exports write one; left in, it would become part of the first id), an
undecodable line quarantined with its ``file:line`` while the rest of the file is still read.
:func:`json_objects` adds the JSON-lines layer (one object per line) on top.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .quarantine import Quarantine
from .uris import URIPath, input_path, open_input


def read_lines(path: str | Path | URIPath, q: Quarantine, *, keep_ends: bool = False
               ) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 text file (``.gz`` too), local or on a URI; without the
    newline unless ``keep_ends`` (a CSV reader needs it to read quoted fields that span lines).

    A missing file raises the quarantine's error type (``q.error``) naming the path; an undecodable
    line goes to ``q`` with its file and line.
    """
    path = input_path(path)
    if not path.is_file():
        raise q.error(f"{path}: no such file")
    with open_input(path, "rb", compression="gzip" if path.suffix == ".gz" else None) as f:
        for no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                q.bad(f"{path}:{no}", f"undecodable bytes ({e.reason} at byte {e.start})",
                      raw.decode("utf-8", "replace"))
                continue
            yield no, line if keep_ends else line.rstrip("\r\n")


def json_objects(path: str | Path | URIPath, q: Quarantine
                 ) -> Iterator[tuple[str, dict[str, Any], str]]:
    """``(file:line, object, line)`` of each non-blank line of a JSON-lines file that holds a JSON
    object; malformed JSON and other values go to ``q``."""
    for no, line in read_lines(path, q):
        if not line.strip():
            continue
        where = f"{path}:{no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            q.bad(where, f"malformed JSON ({e.msg})", line)
            continue
        if not isinstance(row, dict):
            q.bad(where, "expected a JSON object", line)
            continue
        yield where, row, line
