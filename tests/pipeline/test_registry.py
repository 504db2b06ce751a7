"""Stage registry: decorated functions, typed parameters, warnings, third-party entry points."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydantic import BaseModel

from pipeline.registry import NoParams, Registry, stage

from ..conftest import make_plugin_site, stele


class P(BaseModel):
    dim: int = 4


def test_decorator_infers_params_and_resources() -> None:
    reg = Registry(_loaded=True)

    @stage("demo.thing", version="3", cpus=0, gpus=1, registry=reg)
    def thing(ctx, params: P) -> None:
        """Does a thing.

        More text."""

    st = reg.get("demo.thing")
    assert st.params is P and st.version == "3" and st.fn is thing
    assert st.resources.cpus == 0 and st.resources.gpus == 1
    assert st.description == "Does a thing."
    assert st.parameters() == [{"name": "dim", "type": "int", "default": 4, "description": ""}]

    @stage("demo.noparams", registry=reg)
    def bare(ctx) -> None: ...

    assert reg.get("demo.noparams").params is NoParams


def test_overwriting_a_name_warns_reregistering_does_not() -> None:
    reg = Registry(_loaded=True)

    def a(ctx, params: P) -> None: ...

    def b(ctx, params: P) -> None: ...

    stage("x.y", registry=reg)(a)
    with pytest.warns(UserWarning, match="overwritten"):
        stage("x.y", registry=reg)(b)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stage("x.y", registry=reg)(b)  # same function again (a Ray worker re-importing): silent


def test_bad_declarations() -> None:
    with pytest.raises(ValueError, match="dotted identifiers"):
        stage("Not A Name")
    reg = Registry(_loaded=True)
    with pytest.raises(TypeError, match="pydantic model"):
        stage("x.z", registry=reg)(lambda ctx, params: None)


def test_parameter_types_read_as_yaml_values() -> None:
    from typing import Literal

    from pipeline.registry import type_name

    assert type_name(int | Literal["auto"]) == "int | 'auto'"
    assert type_name(Literal["center", "squash"] | None) == "'center' | 'squash' | None"
    assert type_name(float | None) == "float | None"
    assert type_name(tuple[int, int, int]) == "tuple[int, int, int]"
    assert type_name(P) == "P"


def test_unknown_type_suggests() -> None:
    reg = Registry(_loaded=True)
    stage("knowledge.embed", registry=reg)(lambda ctx: None)
    with pytest.raises(KeyError, match="did you mean 'knowledge.embed'"):
        reg.get("knowledge.embedd")


def test_builtin_stages_come_through_the_entry_point() -> None:
    from pipeline.registry import REGISTRY

    assert "core.snapshot" in REGISTRY.all()


def test_third_party_plugin_via_entry_point(tmp_path: Path) -> None:
    """A separate distribution adds a stage type with no edit to stele: `stele stages` lists it."""
    src = tmp_path / "src.py"
    src.write_text(
        "from pydantic import BaseModel\n"
        "from pipeline import stage\n\n"
        "class Params(BaseModel):\n"
        "    size: int = 7\n\n"
        "@stage('acme.count', version='2')\n"
        "def count(ctx, params: Params):\n"
        "    '''Counts to size.'''\n"
        "    (ctx.out / 'n.txt').write_text(str(params.size))\n")
    site = make_plugin_site(tmp_path / "acme", module_src=src, name="acme_stele")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    out = stele("stages", "acme.count", env=env, check=True).stdout
    assert "acme.count" in out and "v2" in out and "Counts to size." in out and "size" in out


def test_broken_plugin_is_reported_not_fatal(tmp_path: Path) -> None:
    src = tmp_path / "broken.py"
    src.write_text("raise ImportError('needs libfoo')\n")
    site = make_plugin_site(tmp_path / "b", module_src=src, name="broken_stele")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    proc = stele("stages", env=env)
    assert proc.returncode == 0
    assert "core.snapshot" in proc.stdout
    assert "broken_stele" in proc.stdout and "needs libfoo" in proc.stdout
    p = tmp_path / "p.yaml"
    p.write_text("stages:\n  a: {uses: broken.thing}\n")
    proc = stele("plan", str(p), env=env)
    assert proc.returncode == 2
    assert "plugins that failed to load: broken_stele" in proc.stderr
    assert isinstance(proc, subprocess.CompletedProcess)
