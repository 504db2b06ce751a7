"""pipeline.quarantine: reasons count the same kind of problem together, on every run."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import StageFailed
from pipeline.quarantine import Quarantine, describe


class _Opaque:
    """An object with Python's default repr, which holds its memory address."""


def test_reasons_holding_object_reprs_count_together_without_addresses() -> None:
    q = Quarantine("src", "skip")
    for i in range(3):  # three objects: three addresses
        q.bad(f"f:{i}", f"cannot use {_Opaque()}", "x")
    assert q.by_reason == {f"cannot use <{__name__}._Opaque object>": 3}
    assert all("0x" not in e["reason"] for e in q.examples)

    with pytest.raises(StageFailed) as e:
        Quarantine("src").bad("f:1", f"cannot use {_Opaque()}")
    assert "0x" not in str(e.value) and "_Opaque object>" in str(e.value)


def test_reasons_are_one_line() -> None:
    q = Quarantine("src", "skip")
    q.bad("f:1", "bad syntax\n  at ^ here")
    assert q.by_reason == {"bad syntax at ^ here": 1}


def test_describe_says_what_an_exception_means() -> None:
    assert describe(KeyError("mainsnak")) == "missing key 'mainsnak'"
    assert describe(ValueError()) == "ValueError"
    assert describe(TypeError(f"bad {_Opaque()}")) == f"bad <{__name__}._Opaque object>"
    with pytest.raises(json.JSONDecodeError) as e:
        json.loads('{"a": }')
    assert describe(e.value) == "Expecting value at column 7"
    with pytest.raises(UnicodeDecodeError) as e:
        b"ab\xff".decode("utf-8")
    assert describe(e.value) == "undecodable bytes (invalid start byte at byte 2)"
