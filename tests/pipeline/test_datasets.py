"""The readers image and audio datasets share (pipeline.datasets), and how a dataset pickles."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import PrivateAttr

from pipeline.datasets import (DatasetError, Item, MediaDataset, hf_offline, read_media, read_records,
                               text_list, unique_ids)
from pipeline.feature_stage import Listing
from pipeline.quarantine import Quarantine
from pipeline.readers import read_lines


def _records(path: Path, fmt: str) -> tuple[list[tuple], Quarantine]:
    q = Quarantine("t", "skip")
    return list(read_records(path, fmt, "file", "text", q, params="file_column / text_column")), q


def _bad(q: Quarantine, path: Path) -> list[tuple[str, str]]:
    return [(e["where"].removeprefix(f"{path}:"), e["reason"]) for e in q.examples]


def test_csv_records_span_lines_normalise_paths_and_quarantine_bad_rows(tmp_path: Path):
    path = tmp_path / "t.csv"
    path.write_bytes("\ufefffile,text,speaker\n"            # a spreadsheet's byte-order mark
                     "./a//x.wav, hello ,ann\n"
                     '"b.wav","two\nlines",bob\n'
                     "c.wav,too,many,cells\n"
                     "\n"
                     " ,no file,cy\n".encode() + b"d.wav,\xff,dee\n")
    records, q = _records(path, "csv")
    assert records == [(f"{path}:2", "a/x.wav", ["hello"], {"speaker": "ann"}),
                       (f"{path}:3", "b.wav", ["two\nlines"], {"speaker": "bob"})]
    assert _bad(q, path) == [("5", "expected 3 columns, found 4"), ("7", "empty 'file'"),
                             ("8", "undecodable bytes (invalid start byte at byte 6)")]


def test_tsv_records_do_not_unquote(tmp_path: Path):
    path = tmp_path / "t.tsv"
    path.write_text('file\ttext\na.wav\t"quoted"\nb.wav\n', encoding="utf-8")
    records, q = _records(path, "tsv")
    assert records == [(f"{path}:2", "a.wav", ['"quoted"'], {})]
    assert _bad(q, path) == [("3", "expected 2 columns, found 1")]


def test_jsonl_records_take_text_lists_and_quarantine_bad_lines(tmp_path: Path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"file": "a.wav", "text": ["one", " two "], "lang": "en"}\n'
                    "\n"
                    '{"file": "b.wav"\n'
                    '["a.wav", "x"]\n'
                    '{"text": "x"}\n'
                    '{"file": " ", "text": "x"}\n'
                    '{"file": "c.wav", "text": 3}\n', encoding="utf-8")
    records, q = _records(path, "jsonl")
    assert records == [(f"{path}:1", "a.wav", ["one", "two"], {"lang": "en"})]
    assert [r for _, r in _bad(q, path)] == [
        "malformed JSON (Expecting ',' delimiter)", "expected a JSON object", "missing field 'file'",
        "field 'file' must be a non-empty path", "field 'text' must be a string or a list of strings"]
    assert [w for w, _ in _bad(q, path)] == ["3", "4", "5", "6", "7"]


def test_a_header_without_the_columns_names_the_parameters(tmp_path: Path):
    path = tmp_path / "t.csv"
    path.write_text("path,caption\na.wav,x\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=rf"{path}:1: header has no column 'file', 'text' .*"
                                           r"set file_column / text_column"):
        _records(path, "csv")


def test_small_helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    q = Quarantine("t", "skip")
    items = [Item(id="a", media="1", where="f:1"), Item(id="b", media="2"),
             Item(id="a", media="3", where="f:3")]
    assert [i.media for i in unique_ids(iter(items), q)] == ["1", "2"]
    assert q.examples == [{"where": "f:3", "reason": "duplicate id", "text": "a"}]
    assert text_list(" a ") == ["a"] and text_list(["", " b"]) == ["", "b"]
    assert text_list(["a", 1]) is None and text_list(None) is None
    (tmp_path / "l.txt").write_bytes(b"\xef\xbb\xbfone\ntwo")
    assert list(read_lines(tmp_path / "l.txt", q, keep_ends=True)) == [(1, "one\n"), (2, "two")]
    assert list(read_lines(tmp_path / "l.txt", q)) == [(1, "one"), (2, "two")]
    with pytest.raises(OSError, match=f"cannot read audio {tmp_path / 'no.wav'}: No such file"):
        read_media(tmp_path / "no.wav", "audio")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    assert not hf_offline()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "true")
    assert hf_offline()


class Cached(MediaDataset):
    modality: ClassVar[str] = "image"
    path: str
    _cache: Any = PrivateAttr(default=None)  # opened on first use, per process
    _derived: str = PrivateAttr()            # built from the parameters at validation

    def model_post_init(self, context: Any) -> None:
        super().model_post_init(context)
        self._derived = self.path.upper()

    def items(self, q: Quarantine) -> Iterator[Item]:
        yield Item(id="a", media="a", where="list:1")
        q.bad("list:2", "broken record")


def test_pickling_resets_caches_and_keeps_what_validation_built():
    ds = Cached(path="p", type="cached")
    ds._cache = object()  # e.g. an opened table: not for another process
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.model_dump() == ds.model_dump() and copy._cache is None and copy._derived == "P"
    assert ds._cache is not None  # pickling does not touch the original


def test_listing_raises_a_dataset_error(tmp_path: Path):
    listing = Listing(Cached(path="p", type="cached", on_error="raise"), tmp_path, writer=None)
    with pytest.raises(DatasetError, match="list:2: broken record"):
        list(listing)


def test_plan_with_an_unknown_dataset_type_is_one_line_exit_2(plan_error) -> None:
    p, line = plan_error("name: bad_dataset\nstages:\n  imgs:\n    uses: vision.features\n    with:\n"
                         "      dataset: {type: imagefolder, captions: c.csv}\n")
    assert line.startswith(f"error: {p}:6: stages.imgs.with.dataset: "), line
    assert "unknown media dataset 'imagefolder'" in line, line
    assert "did you mean 'image_folder'" in line, line
