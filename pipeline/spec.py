"""Pipeline spec: YAML -> typed, validated models, before anything runs.

A pipeline file::

    name: kg-demo                    # optional
    store: ./stele-store             # optional; relative to this file; --store / STELE_STORE override
    stages:
      ingest:
        uses: acme.ingest            # a registered stage type
        # (`!path data/x.tsv` is a path relative to this file)
        with: {sources: [...]}       # its parameters, validated by the type's pydantic model
      embed:
        uses: acme.embed
        inputs: {data: ingest}       # role -> upstream stage ([ingest]: the name is the role)
        resources: {cpus: 0, gpus: 1}
    pools: {train: 1}                # optional: at most one stage of pool `train` at a time

A stage's ``resources`` override its type's defaults field by field (a training stage type may
default to ``{cpus: 0, pool: train}``); pools no pipeline caps are unlimited.

Every error names the file, the line and the field (``demo.yaml:12: stages.embed.with.dim: ...``),
and a file's mistakes are reported together (up to :data:`MAX_SPEC_ERRORS`, in line order): one
stage's unknown type, another's misspelt parameter and a third's unknown input come out as three
lines, not one per attempt. Only YAML that cannot be read at all stops at its first problem.
Inputs are checked against the input roles each stage type declares (``stele stages`` lists them):
an unknown role, a missing required role, or an upstream stage of a type the role does not take is
an error before anything runs. In the list form (``inputs: [a, b]``) each upstream stage's name is
also its role.
``--set stage.param=value`` overrides parameters; the value is read as YAML (``3`` is an int,
``[a, b]`` a list) and nested parameters use more dots (``--set embed.optimizer.lr=0.01``).
"""

from __future__ import annotations

import dataclasses
import difflib
import graphlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator

from .errors import SpecError
from .registry import REGISTRY, Input, Registry, Resources, StageType
from .spec_yaml import SET_FILE, LimitedLoader, LimitError, Locator, load_yaml

_STAGE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
MAX_SPEC_ERRORS = 20  # past this, the rest are most likely consequences of the first ones


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    uses: str
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")
    inputs: list[str] | dict[str, str] = Field(default_factory=list)
    resources: Resources | None = None

    @field_validator("with_", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return {} if v is None else v  # `with:` with nothing under it


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    store: str | None = None
    pools: dict[str, PositiveInt] = Field(default_factory=dict)
    # Each stage is validated as a StageSpec on its own (parse_pipeline), so that a mistake in one
    # stage does not hide those of the others.
    stages: dict[str, Any] = Field(min_length=1)


@dataclass(frozen=True)
class Stage:
    """One resolved stage: its type, validated parameters, inputs (role -> stage name), resources."""

    name: str
    type: StageType
    params: BaseModel
    inputs: dict[str, str]
    resources: Resources
    line: int | None = None  # where the stage is declared, for errors found later (plan time)


@dataclass(frozen=True)
class Pipeline:
    path: Path | None
    source: str  # what errors call the file (the path, or "<string>")
    name: str
    store: str | None
    stages: dict[str, Stage]  # in a topological order
    pools: dict[str, int] = field(default_factory=dict)  # pool -> most stages running at once

    def ancestors(self, name: str) -> set[str]:
        seen: set[str] = set()
        todo = list(self.stages[name].inputs.values())
        while todo:
            s = todo.pop()
            if s not in seen:
                seen.add(s)
                todo.extend(self.stages[s].inputs.values())
        return seen

    def descendants(self, name: str) -> set[str]:
        out: set[str] = set()
        for s in self.stages.values():  # topological order: parents are decided before children
            if any(p == name or p in out for p in s.inputs.values()):
                out.add(s.name)
        return out


def _unused_pool(pool: str, stages: dict[str, Stage]) -> str | None:
    """Why capping ``pool`` would cap nothing (no stage is in it: most likely a typo), else None."""
    used = sorted({s.resources.pool for s in stages.values() if s.resources.pool})
    if pool in used:
        return None
    return f"no stage is in pool {pool!r}; pools the stages use: {', '.join(used) or 'none'}"


def with_pools(pipeline: Pipeline, items: list[str]) -> Pipeline:
    """``--pool train=2`` (``NAME=N``, repeatable) on top of the pipeline's ``pools:``."""
    pools = dict(pipeline.pools)
    for item in items:
        name, _, size = item.partition("=")
        if not size.strip().isdigit() or int(size) < 1:
            raise SpecError(f"{item!r}: expected NAME=N with N >= 1", file="--pool")
        if problem := _unused_pool(name, pipeline.stages):
            raise SpecError(problem, file="--pool")
        pools[name] = int(size)
    return dataclasses.replace(pipeline, pools=pools)


class SpecErrors(SpecError):
    """Several mistakes found together: one ``file:line: field: message`` line each; ``file``,
    ``line``, ``field`` and ``message`` are the first one's."""

    def __init__(self, errors: list[SpecError]):
        self.errors = errors
        first = errors[0]
        super().__init__(first.message, file=first.file, line=first.line, field=first.field)

    def __str__(self) -> str:
        return "\n".join(SpecError.__str__(e) for e in self.errors)


def _roles_line(st: StageType) -> str:
    roles = st.inputs or {}
    if not roles:
        return f"{st.name} takes no inputs"
    return f"roles of {st.name}: " + ", ".join(
        f"{r} ({i.describe_takes()}{'' if i.required else ', optional'})" for r, i in roles.items())


def _check_roles(name: str, listed: list[str] | None, roles: dict[str, str],
                 types: dict[str, StageType], loc: Locator) -> list[SpecError]:
    """The stage's inputs against the roles its type declares (nothing to check when it declares
    none). Only stage type names are compared: the engine knows no domain."""
    st = types[name]
    if st.inputs is None:
        return []
    declared: dict[str, Input] = st.inputs
    errors, suggested = [], set()
    for role, up in roles.items():
        where = ("stages", name, "inputs", listed.index(up) if listed is not None else role)
        up_type = types[up].name
        spec = declared.get(role)
        if spec is None:
            close = difflib.get_close_matches(role, list(declared), n=1)
            if not close:  # a free role that takes the upstream's type is the likely meaning
                close = [r for r, d in declared.items() if r not in roles and d.accepts(up_type)][:1]
            suggested.update(close)
            if listed is not None:
                hint = (f"name the role: inputs: {{{close[0]}: {up}}}" if close
                        else _roles_line(st))
                msg = (f"unknown input role {role!r} of {st.name} (in a list, the stage's name is "
                       f"its role); {hint}")
            else:
                msg = f"unknown input role {role!r} of {st.name}"
                if close:
                    msg += f" (did you mean {close[0]!r}?)"
                msg += f"; {_roles_line(st)}"
            errors.append(loc.error(where, msg))
        elif not spec.accepts(up_type):
            errors.append(loc.error(where, f"input role {role!r} of {st.name} takes "
                                           f"{spec.describe_takes()}; stage {up!r} is {up_type}"))
    for role, spec in declared.items():
        if spec.required and role not in roles and role not in suggested:
            msg = f"missing required input role {role!r} of {st.name} (takes {spec.describe_takes()})"
            errors.append(loc.error(("stages", name, "inputs"),
                                    msg + (f": {spec.help}" if spec.help else "")))
    return errors


def _data_path(data: Any, path: tuple) -> tuple:
    """``path`` (a pydantic error's location) without the steps that are no keys of ``data`` but
    names pydantic gives a union's members or a validator (``('dim', 'int')`` -> ``('dim',)``), so
    that an error names the field as the YAML writes it, once."""
    out, node = [], data
    for step in path:
        if isinstance(node, dict) and step in node:
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            node = node[step]
        else:
            continue
        out.append(step)
    return tuple(out)


def _pydantic_errors(loc: Locator, base: tuple, err: ValidationError, what: str,
                     model: type[BaseModel] | None = None, data: Any = None) -> list[SpecError]:
    """One error per field pydantic found wrong (the first of a union's member errors)."""
    out, seen = [], set()
    for e in err.errors():
        raw = tuple(e["loc"])
        if e["type"] == "missing":
            where = _data_path(data, raw[:-1])
            key = (*where, raw[-1])
        else:
            key = where = _data_path(data, raw) if data is not None else raw
        if key in seen:
            continue
        seen.add(key)
        path = base + where
        if e["type"] == "missing":
            out.append(loc.error(path, f"missing required {what} {str(raw[-1])!r}"))
        elif e["type"] == "extra_forbidden":
            known = (f"; known: {', '.join(f.alias or n for n, f in model.model_fields.items())}"
                     if model and len(raw) == 1 else "")
            out.append(loc.error(path, f"unknown {what} {str(raw[-1])!r}{known}"))
        else:
            got = f" (got {e['input']!r})" if not isinstance(e.get("input"), (dict, list)) else ""
            out.append(loc.error(path, f"{e['msg']}{got}"))
    return out


class _Collected:
    """The mistakes of one file, raised together: at most :data:`MAX_SPEC_ERRORS` lines, in the
    order of the file (``--set`` values first: they replace what the file says)."""

    def __init__(self, file: str):
        self.file = file
        self.errors: list[SpecError] = []

    def add(self, *errors: SpecError) -> None:
        self.errors.extend(errors)

    def raise_any(self) -> None:
        if not self.errors:
            return
        unique = list({str(e): e for e in self.errors}.values())
        unique.sort(key=lambda e: (e.file != SET_FILE, e.line or 0))
        if len(unique) > MAX_SPEC_ERRORS:
            more = len(unique) - MAX_SPEC_ERRORS
            unique = [*unique[:MAX_SPEC_ERRORS],
                      SpecError(f"{more} more mistake{'s' if more > 1 else ''} not shown; "
                                f"fix these first", file=self.file)]
        raise unique[0] if len(unique) == 1 else SpecErrors(unique)


# ------------------------------------------------------------------------------------ overrides
def parse_overrides(items: list[str] | Mapping[str, Any] | None) -> list[tuple[list[str], Any, str]]:
    """``stage.a.b=value`` -> (["stage", "a", "b"], value read as YAML, original text). A mapping
    ``{"stage.a.b": value}`` (from Python) gives its values as they are, not read as YAML."""
    if isinstance(items, Mapping):
        out = []
        for key, value in items.items():
            parts = str(key).strip().split(".")
            text = f"{key}={value!r}"
            if len(parts) < 2 or not all(parts):
                raise SpecError("expected STAGE.PARAM as the key", file=SET_FILE, field=text)
            out.append((parts, str(value) if isinstance(value, PathLike) else value, text))
        return out
    out = []
    for item in items or []:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise SpecError("expected STAGE.PARAM=VALUE", file=SET_FILE, field=item)
        try:
            value = yaml.load(raw, Loader=LimitedLoader) if raw.strip() else ""
        except yaml.YAMLError as e:
            problem = e.problem if isinstance(e, LimitError) else e
            raise SpecError(f"value is not valid YAML: {problem}", file=SET_FILE,
                            field=item) from None
        out.append((parts, value, item))
    return out


def _apply_overrides(data: dict, overrides: list[tuple[list[str], Any, str]],
                     loc: Locator) -> list[SpecError]:
    """Set the overridden values in ``data``; the overrides naming no stage of it are returned."""
    stages = data.get("stages") if isinstance(data, dict) else None
    errors = []
    for parts, value, text in overrides:
        name, keys = parts[0], parts[1:]
        if not isinstance(stages, dict) or name not in stages:
            known = ", ".join(stages) if isinstance(stages, dict) and stages else "none"
            errors.append(SpecError(f"unknown stage {name!r}; stages: {known}", file=SET_FILE,
                                    field=text))
            continue
        spec = stages[name] if isinstance(stages[name], dict) else {}
        target = spec.get("with")
        if target is None:
            target = spec["with"] = {}
        for k in keys[:-1]:
            nxt = target.get(k)
            if not isinstance(nxt, dict):
                nxt = target[k] = {}
            target = nxt
        target[keys[-1]] = value
        loc.overrides[("stages", name, "with", *keys)] = text
    return errors


# ------------------------------------------------------------------------------------ load
def load_pipeline(path: str | Path, overrides: list[str] | Mapping[str, Any] | None = None,
                  registry: Registry | None = None) -> Pipeline:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"cannot read pipeline: {e.strerror}", file=str(path)) from None
    return parse_pipeline(text, file=str(path), overrides=overrides, registry=registry,
                          base_dir=path.parent)


def parse_pipeline(text: str, *, file: str = "<string>",
                   overrides: list[str] | Mapping[str, Any] | None = None,
                   registry: Registry | None = None, base_dir: Path | None = None) -> Pipeline:
    registry = registry or REGISTRY
    parsed_overrides = parse_overrides(overrides)
    data, lines = load_yaml(text, file, base_dir)
    loc = Locator(file, lines, {})
    if not isinstance(data, dict):
        raise loc.error((), "a pipeline is a mapping with a 'stages:' key")
    errors = _Collected(file)
    errors.add(*_apply_overrides(data, parsed_overrides, loc))

    spec: PipelineSpec | None = None
    try:
        spec = PipelineSpec.model_validate(data)
        raw_stages, pools = spec.stages, spec.pools
    except ValidationError as e:  # the stages are still checked, for their own mistakes
        errors.add(*_pydantic_errors(loc, (), e, "field", PipelineSpec, data))
        raw_stages = data["stages"] if isinstance(data.get("stages"), dict) else {}
        pools = {}
    # Each stage on its own; a stage with a mistake is left out of the checks that would only
    # repeat it (its inputs, roles and parameters), and the others are checked all the same.
    specs: dict[str, StageSpec] = {}
    for name, raw in raw_stages.items():
        if not _STAGE_NAME.match(str(name)):
            errors.add(loc.error(("stages", name), f"stage name {name!r} must match "
                                                   f"{_STAGE_NAME.pattern} (no dots)"))
            continue
        try:
            specs[name] = StageSpec.model_validate(raw)
        except ValidationError as e:
            errors.add(*_pydantic_errors(loc, ("stages", name), e, "field", StageSpec, raw))

    # Stage types.
    types: dict[str, StageType] = {}
    for name, s in specs.items():
        try:
            types[name] = registry.get(s.uses)
        except KeyError as e:
            errors.add(loc.error(("stages", name, "uses"), e.args[0]))

    # Inputs: unknown names, then cycles among the rest.
    inputs: dict[str, dict[str, str]] = {}
    unresolved: set[str] = set()  # stages with an input left out: their roles are not checked
    for name, s in specs.items():
        pairs = (s.inputs.items() if isinstance(s.inputs, dict)
                 else ((up, up) for up in s.inputs))
        inputs[name] = {}
        for i, (role, up) in enumerate(pairs):
            where = ("stages", name, "inputs", role if isinstance(s.inputs, dict) else i)
            if up not in raw_stages:
                errors.add(loc.error(where, f"unknown input stage {up!r}; stages: "
                                            f"{', '.join(raw_stages)}"))
            elif up == name:
                errors.add(loc.error(where, f"stage {name!r} lists itself as an input"))
            elif up in specs:
                inputs[name][role] = up
                continue
            unresolved.add(name)  # (an upstream with a mistake of its own is reported as that)
    sorter = graphlib.TopologicalSorter({n: set(i.values()) for n, i in inputs.items()})
    try:
        order = list(sorter.static_order())
    except graphlib.CycleError as e:
        cycle = e.args[1]
        errors.add(loc.error(("stages", cycle[0], "inputs"),
                             "cycle in stage inputs: " + " -> ".join(cycle)))
        order = list(inputs)

    # Input roles, as each stage type declares them (between stages whose types are known).
    for name, s in specs.items():
        if name in types and name not in unresolved and all(up in types
                                                              for up in inputs[name].values()):
            errors.add(*_check_roles(name, None if isinstance(s.inputs, dict) else s.inputs,
                                     inputs[name], types, loc))

    # Parameters, validated by each type's own model.
    stages: dict[str, Stage] = {}
    for name in order:
        if name not in types:
            continue
        s, st = specs[name], types[name]
        try:
            params = st.params.model_validate(s.with_)
        except ValidationError as e:
            errors.add(*_pydantic_errors(loc, ("stages", name, "with"), e, "parameter", st.params,
                                         s.with_))
            continue
        stages[name] = Stage(name=name, type=st, params=params, inputs=inputs[name],
                             resources=st.resources.model_copy(
                                 update=s.resources.model_dump(exclude_unset=True))
                             if s.resources else st.resources,
                             line=lines.get(("stages", name, "with"), lines.get(("stages", name))))

    if len(stages) == len(raw_stages):  # which pools stages use is known only when all are
        for pool in pools:
            if problem := _unused_pool(pool, stages):
                errors.add(loc.error(("pools", pool), problem))
    errors.raise_any()
    assert spec is not None  # (its errors were raised above)

    store = spec.store
    if store and base_dir is not None and "://" not in store and not Path(store).is_absolute():
        store = str((base_dir / store).resolve())
    name = spec.name or (Path(file).stem if file != "<string>" else "pipeline")
    return Pipeline(path=Path(file) if file != "<string>" else None, source=file, name=name,
                    store=store, stages=stages, pools=dict(spec.pools))
