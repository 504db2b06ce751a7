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

Every error names the file, the line and the field (``demo.yaml:12: stages.embed.with.dim: ...``).
Inputs are checked against the input roles each stage type declares (``stele stages`` lists them):
an unknown role, a missing required role, or an upstream stage of a type the role does not take is
an error before anything runs, every such mistake of the file at once. In the list form
(``inputs: [a, b]``) each upstream stage's name is also its role.
``--set stage.param=value`` overrides parameters; the value is read as YAML (``3`` is an int,
``[a, b]`` a list) and nested parameters use more dots (``--set embed.optimizer.lr=0.01``).
"""

from __future__ import annotations

import dataclasses
import difflib
import graphlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator

from .errors import SpecError
from .registry import REGISTRY, Input, Registry, Resources, StageType
from .spec_yaml import SET_FILE, LimitedLoader, LimitError, Locator, load_yaml

_STAGE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


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
    stages: dict[str, StageSpec] = Field(min_length=1)

    @field_validator("stages")
    @classmethod
    def _names(cls, v: dict[str, StageSpec]) -> dict[str, StageSpec]:
        for name in v:
            if not _STAGE_NAME.match(str(name)):
                raise ValueError(f"stage name {name!r} must match {_STAGE_NAME.pattern} (no dots)")
        return v


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


def _pydantic_error(loc: Locator, base: tuple, err: ValidationError, what: str,
                    model: type[BaseModel] | None = None) -> SpecError:
    e = err.errors()[0]
    path = base + tuple(e["loc"])
    if e["type"] == "missing":
        return loc.error(path[:-1], f"missing required {what} {str(path[-1])!r}")
    if e["type"] == "extra_forbidden":
        known = f"; known: {', '.join(model.model_fields)}" if model and len(e["loc"]) == 1 else ""
        return loc.error(path, f"unknown {what} {str(path[-1])!r}{known}")
    got = f" (got {e['input']!r})" if not isinstance(e.get("input"), (dict, list)) else ""
    return loc.error(path, f"{e['msg']}{got}")


# ------------------------------------------------------------------------------------ overrides
def parse_overrides(items: list[str] | None) -> list[tuple[list[str], Any, str]]:
    """``stage.a.b=value`` -> (["stage", "a", "b"], value read as YAML, original text)."""
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
                     loc: Locator) -> None:
    stages = data.get("stages") if isinstance(data, dict) else None
    for parts, value, text in overrides:
        name, keys = parts[0], parts[1:]
        if not isinstance(stages, dict) or name not in stages:
            raise SpecError(f"unknown stage {name!r}; stages: {', '.join(stages or {}) or 'none'}",
                            file=SET_FILE, field=text)
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


# ------------------------------------------------------------------------------------ load
def load_pipeline(path: str | Path, overrides: list[str] | None = None,
                  registry: Registry | None = None) -> Pipeline:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"cannot read pipeline: {e.strerror}", file=str(path)) from None
    return parse_pipeline(text, file=str(path), overrides=overrides, registry=registry,
                          base_dir=path.parent)


def parse_pipeline(text: str, *, file: str = "<string>", overrides: list[str] | None = None,
                   registry: Registry | None = None, base_dir: Path | None = None) -> Pipeline:
    registry = registry or REGISTRY
    parsed_overrides = parse_overrides(overrides)
    data, lines = load_yaml(text, file, base_dir)
    loc = Locator(file, lines, {})
    if not isinstance(data, dict):
        raise loc.error((), "a pipeline is a mapping with a 'stages:' key")
    _apply_overrides(data, parsed_overrides, loc)

    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as e:
        raise _pydantic_error(loc, (), e, "field", PipelineSpec) from None

    # Stage types.
    types: dict[str, StageType] = {}
    for name, s in spec.stages.items():
        try:
            types[name] = registry.get(s.uses)
        except KeyError as e:
            raise loc.error(("stages", name, "uses"), e.args[0]) from None

    # Inputs: unknown names, then cycles.
    inputs: dict[str, dict[str, str]] = {}
    for name, s in spec.stages.items():
        pairs = (s.inputs.items() if isinstance(s.inputs, dict)
                 else ((up, up) for up in s.inputs))
        inputs[name] = {}
        for i, (role, up) in enumerate(pairs):
            where = ("stages", name, "inputs", role if isinstance(s.inputs, dict) else i)
            if up not in spec.stages:
                raise loc.error(where, f"unknown input stage {up!r}; stages: {', '.join(spec.stages)}")
            if up == name:
                raise loc.error(where, f"stage {name!r} lists itself as an input")
            inputs[name][role] = up
    sorter = graphlib.TopologicalSorter({n: set(i.values()) for n, i in inputs.items()})
    try:
        order = list(sorter.static_order())
    except graphlib.CycleError as e:
        cycle = e.args[1]
        raise loc.error(("stages", cycle[0], "inputs"),
                        "cycle in stage inputs: " + " -> ".join(cycle)) from None

    # Input roles, as each stage type declares them: every mistake of the file at once.
    role_errors = [e for name, s in spec.stages.items()
                   for e in _check_roles(name, None if isinstance(s.inputs, dict) else s.inputs,
                                         inputs[name], types, loc)]
    if role_errors:
        raise (role_errors[0] if len(role_errors) == 1 else SpecErrors(role_errors))

    # Parameters, validated by each type's own model.
    stages: dict[str, Stage] = {}
    for name in order:
        s, st = spec.stages[name], types[name]
        try:
            params = st.params.model_validate(s.with_)
        except ValidationError as e:
            raise _pydantic_error(loc, ("stages", name, "with"), e, "parameter", st.params) from None
        stages[name] = Stage(name=name, type=st, params=params, inputs=inputs[name],
                             resources=st.resources.model_copy(
                                 update=s.resources.model_dump(exclude_unset=True))
                             if s.resources else st.resources,
                             line=lines.get(("stages", name, "with"), lines.get(("stages", name))))

    for pool in spec.pools:
        if problem := _unused_pool(pool, stages):
            raise loc.error(("pools", pool), problem)

    store = spec.store
    if store and base_dir is not None and "://" not in store and not Path(store).is_absolute():
        store = str((base_dir / store).resolve())
    name = spec.name or (Path(file).stem if file != "<string>" else "pipeline")
    return Pipeline(path=Path(file) if file != "<string>" else None, source=file, name=name,
                    store=store, stages=stages, pools=dict(spec.pools))
