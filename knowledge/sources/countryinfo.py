"""``countryinfo``: facts about ~250 countries from the countryinfo package's JSON files (MIT).

Entities: countries (id = ISO 3166 alpha-3 code, name, alternative spellings and native name as
aliases), their capitals, provinces, languages (ISO 639-1 codes), currencies (ISO 4217 codes),
regions and subregions. Relations: ``capital``, ``borders``, ``language``, ``currency``, ``region``,
``subregion``, ``province``. The files are read straight from the installed package
(``pip install countryinfo``); a file that is not a JSON object goes to the quarantine, with the
line where its JSON breaks.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import Field

from .base import Entity, KnowledgeSource, Quarantine, Relation, SourceError, Triple, source

RELATIONS = {
    "capital": "has capital", "borders": "shares a border with", "language": "official language",
    "currency": "currency", "region": "in region", "subregion": "in subregion",
    "province": "has province",
}


def _data_dir() -> Path:
    spec = importlib.util.find_spec("countryinfo")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("the 'countryinfo' source needs the countryinfo package: "
                          "pip install countryinfo")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@source("countryinfo")
class CountryInfoSource(KnowledgeSource):
    """Countries with capitals, borders, languages, currencies, regions and provinces."""

    relations_kept: list[str] = Field(default=list(RELATIONS), description="which relations to emit")

    def files(self) -> list[Path]:
        return sorted(_data_dir().glob("*.json"))

    @cached_property
    def _countries(self) -> list[tuple[str, dict[str, Any]]]:
        # cached per instance: entities() and triples() read the same ~250 files once
        out, self._bad = [], []
        for path in self.files():
            raw = path.read_bytes()
            # file:line like every other source; the reason leaves the position out, so that
            # files broken the same way are counted together.
            try:
                data = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                line = raw[:e.start].count(b"\n") + 1
                self._bad.append((f"{path}:{line}", f"not valid JSON (undecodable bytes: {e.reason})"))
                continue
            except json.JSONDecodeError as e:
                self._bad.append((f"{path}:{e.lineno}", f"not valid JSON ({e.msg})"))
                continue
            if not isinstance(data, dict):
                self._bad.append((f"{path}:1", f"expected a JSON object, found {type(data).__name__}"))
                continue
            code = (data.get("ISO") or {}).get("alpha3") or path.stem
            out.append((code, data))
        return out

    def _report(self, q: Quarantine) -> None:
        _ = self._countries
        for where, reason in self._bad:
            q.bad(where, reason)
        self._bad = []

    def entities(self, q: Quarantine) -> Iterator[Entity]:
        self._report(q)
        for code, d in self._countries:
            name = d.get("name") or code
            aliases = [a for a in [*(d.get("altSpellings") or []), d.get("nativeName") or ""]
                       if a and len(a) > 3 and a != name]
            where = ", ".join(x for x in (d.get("subregion"), d.get("region")) if x)
            yield Entity(code, name=name, aliases=sorted(set(aliases)),
                         description=f"country in {where}" if where else "country",
                         types=["country"])
        seen: set[str] = set()
        for code, d in self._countries:
            for kind, values in self._objects(d).items():
                for v in values:
                    eid = f"{kind}/{v}"
                    if eid not in seen:
                        seen.add(eid)
                        yield Entity(eid, name=v, types=[kind])

    def relations(self, q: Quarantine) -> Iterator[Relation]:
        for rid in self.relations_kept:
            yield Relation(rid, name=RELATIONS[rid])

    def triples(self, q: Quarantine) -> Iterator[Triple]:
        self._report(q)
        codes = {code for code, _ in self._countries}
        for code, d in self._countries:
            objects = self._objects(d)
            kinds = {"capital": "city", "language": "language", "currency": "currency",
                     "region": "region", "subregion": "subregion", "province": "province"}
            for rel, kind in kinds.items():
                if rel in self.relations_kept:
                    for v in objects.get(kind, []):
                        yield Triple(code, rel, f"{kind}/{v}", where=code)
            if "borders" in self.relations_kept:
                for other in d.get("borders") or []:
                    if other in codes:  # a border with a territory the package does not describe
                        yield Triple(code, "borders", other, where=code)

    @staticmethod
    def _objects(d: dict[str, Any]) -> dict[str, list[str]]:
        def strings(x: Any) -> list[str]:
            items = x if isinstance(x, list) else [x]
            return [s.strip() for s in items if isinstance(s, str) and s.strip()]

        return {"city": strings(d.get("capital")), "language": strings(d.get("languages")),
                "currency": strings(d.get("currencies")), "region": strings(d.get("region")),
                "subregion": strings(d.get("subregion")), "province": strings(d.get("provinces"))}
