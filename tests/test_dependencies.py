"""stele's dependencies: ranges in pyproject.toml, the exact tested set in constraints.txt.

pyproject.toml says which versions stele supports (so it installs beside a cluster's own Ray patch
release, torch or Python 3.12); constraints.txt pins what CI installs and tests. These tests keep
the two consistent without touching the network. The last one collects the suite with a Python 3.12
environment when one is given (bench/check_python312.sh builds it).
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
NAME = canonicalize_name(PROJECT["name"])

# Every requirement has a cap at its next release that may break stele, but these: fsspec is
# calendar-versioned and s3fs / gcsfs pin the fsspec of their own release (pyproject.toml says why).
UNCAPPED = {"fsspec", "s3fs", "gcsfs"}


def _requirements(group: str | None) -> list[Requirement]:
    """The requirements of the core dependencies (``None``) or of one extra, without stele's own
    ``stele[...]`` self-references."""
    raw = PROJECT["dependencies"] if group is None else PROJECT["optional-dependencies"][group]
    reqs = [Requirement(r) for r in raw]
    return [r for r in reqs if canonicalize_name(r.name) != NAME]


def _extras_of(group: str) -> set[str]:
    """``group`` and every extra it pulls in through ``stele[...]``."""
    seen, todo = set(), [group]
    while todo:
        g = todo.pop()
        if g in seen:
            continue
        seen.add(g)
        for r in map(Requirement, PROJECT["optional-dependencies"][g]):
            if canonicalize_name(r.name) == NAME:
                todo.extend(r.extras)
    return seen


def _all_requirements() -> list[tuple[str, Requirement]]:
    out = [("dependencies", r) for r in _requirements(None)]
    for group in PROJECT["optional-dependencies"]:
        out += [(f"[{group}]", r) for r in _requirements(group)]
    return out


def _constraints() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for n, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version, (
            f"constraints.txt:{n}: {line!r} is not one exact pin")
        name = canonicalize_name(req.name)
        assert name not in pins, f"constraints.txt:{n}: {req.name} pinned twice"
        if req.marker is None or req.marker.evaluate():
            pins[name] = Version(specs[0].version)
    return pins


def test_constraints_pin_every_tested_requirement_inside_its_range() -> None:
    """Every requirement of what CI installs (``.[dev]`` and the extras it pulls in) has a pin in
    constraints.txt, and every pin there lies in pyproject's range, for the other extras too."""
    pins = _constraints()
    assert NAME not in pins, "constraints.txt pins stele itself (pip freeze --exclude-editable)"
    tested = {None, *_extras_of("dev")}
    problems = []
    for group in [None, *PROJECT["optional-dependencies"]]:
        for req in _requirements(group):
            if req.marker is not None and not req.marker.evaluate():
                continue
            name = canonicalize_name(req.name)
            where = "dependencies" if group is None else f"[{group}]"
            if name not in pins:
                if group in tested:
                    problems.append(f"{where} {req}: no pin in constraints.txt")
            elif not req.specifier.contains(pins[name], prereleases=True):
                problems.append(f"{where} {req}: constraints.txt pins {pins[name]}")
    assert not problems, "\n".join(problems)


def test_no_exact_pins_and_caps_where_releases_break() -> None:
    """Ranges, not pins: every requirement has a lower bound, an upper bound (but the calendar-
    versioned fsspec family) and no ``==``."""
    problems = []
    for where, req in _all_requirements():
        ops = {s.operator for s in req.specifier}
        if ops & {"==", "===", "~="}:
            problems.append(f"{where} {req}: an exact pin")
        if not ops & {">=", ">"}:
            problems.append(f"{where} {req}: no lower bound")
        if canonicalize_name(req.name) not in UNCAPPED and not ops & {"<", "<="}:
            problems.append(f"{where} {req}: no upper bound")
    assert not problems, "\n".join(problems)
    named = {canonicalize_name(r.name) for _, r in _all_requirements()}
    assert UNCAPPED <= named, f"not requirements any more: {sorted(UNCAPPED - named)}"


def test_python_311_and_312_supported() -> None:
    spec = SpecifierSet(PROJECT["requires-python"])
    assert spec.contains("3.11.0") and spec.contains("3.12.9"), spec
    assert not spec.contains("3.10.14"), spec
    classifiers = set(PROJECT["classifiers"])
    assert {"Programming Language :: Python :: 3.11",
            "Programming Language :: Python :: 3.12"} <= classifiers


def test_ci_and_readme_install_with_the_constraints() -> None:
    """CI installs the exact tested set, keys its cached venv on both files, and the README's
    set-up line installs the same way."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert "install -q -e '.[dev]' -c constraints.txt" in ci
    assert "cat pyproject.toml constraints.txt | sha256sum" in ci
    assert "pip install -e '.[dev]' -c constraints.txt" in (ROOT / "README.md").read_text()


def _py312() -> str | None:
    """The interpreter of the Python 3.12 environment named by STELE_TEST_PY312 (a venv folder or
    its python)."""
    given = os.environ.get("STELE_TEST_PY312")
    if not given:
        return None
    path = Path(given)
    return str(path / "bin" / "python" if path.is_dir() else path)


@pytest.mark.timeout(900)
def test_suite_collects_on_python_312() -> None:
    """With a Python 3.12 venv that has stele installed (bench/check_python312.sh builds one and
    sets STELE_TEST_PY312), the whole suite imports and collects there."""
    py = _py312()
    if py is None:
        pytest.skip("STELE_TEST_PY312 is not set: no Python 3.12 environment to collect the suite "
                    "with (bash bench/check_python312.sh builds one and runs this check)")
    if not Path(py).exists():
        pytest.skip(f"STELE_TEST_PY312 names {py}, which does not exist")
    version = subprocess.run([py, "-c", "import sys; print(*sys.version_info[:2], sep='.')"],
                             capture_output=True, text=True, timeout=60)
    assert version.stdout.strip() == "3.12", (py, version.stdout, version.stderr)
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    proc = subprocess.run([py, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "tests"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    assert re.match(r"\d+ tests? collected", last), tail
