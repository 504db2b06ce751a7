"""Stage-type registry.

A stage type is one function registered under a dotted name::

    class EmbedParams(BaseModel):
        model: str = "transe"
        dim: int = 100

    @stage("acme.embed", version="1", cpus=1)
    def embed(ctx: StageContext, params: EmbedParams) -> dict | None:
        ...  # read ctx.inputs, write into ctx.out, return metrics

The parameter model is taken from the annotation of the second argument. ``version`` is part of every
artifact key of the type: bump it when the code changes what the stage writes.

``inputs`` declares the type's input roles, part of its contract: the role a pipeline names in
``inputs: {role: stage}``, the stage types whose artifacts it takes, whether it is required::

    @stage("acme.score", inputs={
        "model": Input("acme.train", "the trained model to score with"),
        "items": Input(("acme.images", "acme.sounds"), "what to score", required=False)})

``stele plan`` and ``stele run`` check every stage's inputs against it before anything starts
(unknown role, missing required role, an upstream stage of a type the role does not take); the
engine compares type names only. ``inputs={}``: the type takes no input. Left out (``None``): the
roles are not declared and not checked (stage types written before roles were declared).

``loader`` says what ``stele.load(store, "stage")`` gives for the type's artifacts: a function of
the artifact's local folder returning the object a user works with (``loader=KnowledgeGraph.load``,
``loader=FeatureSet``); a module that keeps torch out of ``stele plan`` wraps its loader in a
function that imports it. Without one, ``stele.load`` gives the :class:`~pipeline.store.Artifact`.

Packages (stele's own included) make their stage types known through the ``stele.stages`` entry-point
group; an entry point names a module that registers its stages when imported. Keep heavy imports (torch,
timm, ...) inside stage functions so ``stele plan`` and ``stele stages`` stay fast.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
import types
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

ENTRY_POINT_GROUP = "stele.stages"
T = TypeVar("T")


class Resources(BaseModel):
    """What one stage task asks Ray for. Stages that only drive Ray Data or Ray Train jobs should ask
    for ``cpus: 0`` so the orchestrating task never starves its own workers."""

    model_config = ConfigDict(extra="forbid")
    cpus: float = 1.0
    gpus: float = 0.0
    # A named pool that the pipeline may cap (``pools: {train: 1}``): stages in one pool run at most
    # that many at a time. Ray's CPU counts cannot express this for stages that ask for ``cpus: 0``
    # and start their own workers (every pretraining would start at once); an uncapped pool is free.
    pool: str | None = None
    # Ray custom resources the stage's task asks for (``custom: {node_b: 1}``): pins it to the nodes
    # started with them (``ray start --resources='{"node_b": 4}'``). Placement only: like the rest
    # of ``resources``, not part of the artifact key.
    custom: dict[str, float] = Field(default_factory=dict)

    @field_validator("custom")
    @classmethod
    def _custom(cls, v: dict[str, float]) -> dict[str, float]:
        for name, amount in v.items():
            if name in ("CPU", "GPU"):
                raise ValueError(f"ask for {name} with {name.lower()}s:, not under custom")
            if not amount > 0:
                raise ValueError(f"custom resource {name!r}: the amount must be > 0 (got {amount})")
        return v

    @model_serializer(mode="wrap")
    def _drop_empty_custom(self, handler: Any) -> dict[str, Any]:
        # Without custom resources, dumps (manifests, what the stage task receives) stay as they
        # were before the field existed.
        out = handler(self)
        if not self.custom:
            out.pop("custom", None)
        return out


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _valid_type_name(name: str) -> bool:
    return bool(name) and all(part.isidentifier() for part in name.split("."))


@dataclass(frozen=True)
class Input:
    """One input role of a stage type (see ``inputs`` in the module docstring).

    ``takes``: the stage type(s) whose artifacts the role accepts, by name (``"acme.images"`` or
    a tuple of names; an empty tuple: any type). ``help``: one line for ``stele stages``.
    ``required``: a pipeline that leaves the role out is rejected before anything runs.
    """

    takes: str | tuple[str, ...]
    help: str = ""
    required: bool = True

    def __post_init__(self) -> None:
        takes = (self.takes,) if isinstance(self.takes, str) else tuple(self.takes)
        for t in takes:
            if not isinstance(t, str) or not _valid_type_name(t):
                raise ValueError(f"Input takes stage type names (dotted identifiers), got {t!r}")
        object.__setattr__(self, "takes", takes)

    def accepts(self, type_name: str) -> bool:
        return not self.takes or type_name in self.takes

    def describe_takes(self) -> str:
        return " | ".join(self.takes) or "any"


@dataclass(frozen=True)
class StageType:
    name: str
    fn: Callable[..., Any]
    params: type[BaseModel]
    version: str
    resources: Resources
    description: str
    # Optional: extra content to hash into the key (e.g. the content hashes of files a stage reads from
    # outside the store), so that changed data invalidates the cache even when parameters do not change.
    fingerprint: Callable[[BaseModel], Any] | None = None
    # The metrics a run summary shows for this type, in order (fnmatch patterns: ``loss_*_last10``);
    # empty: the first few scalar metrics. Every metric stays in the manifest and the report.
    headline: tuple[str, ...] = ()
    # Input roles (role -> Input), checked before a pipeline runs; None: not declared, not checked.
    inputs: dict[str, Input] | None = None
    # What stele.load gives for an artifact of this type: loader(its local folder); None: the
    # Artifact itself.
    loader: Callable[[Path], Any] | None = None

    @property
    def qualname(self) -> str:
        return f"{self.fn.__module__}.{self.fn.__qualname__}"

    def parameters(self) -> list[dict[str, Any]]:
        return model_parameters(self.params)

    def input_roles(self) -> list[dict[str, Any]]:
        """Role, accepted types, required or not and description of each input, for
        ``stele stages`` (empty when the type takes no input or declares none: see ``inputs``)."""
        return [{"role": role, "takes": list(i.takes), "required": i.required,
                 "description": i.help} for role, i in (self.inputs or {}).items()]


def type_name(ann: Any) -> str:
    """A parameter's type as a YAML author reads it: ``int | 'auto'``, ``'grid' | 'patch'``,
    ``float | None``, ``tuple[int, int, int]``."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is typing.Annotated:  # validators and serialisers are not the YAML author's business
        return type_name(args[0])
    if ann is type(None):
        return "None"
    if isinstance(ann, type) and not args:
        return ann.__name__
    if isinstance(origin, type) and args:  # list[...], dict[..., ...], tuple[...]
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return str(ann).replace("typing.", "").replace("pydantic.functional_serializers.", "")


def model_parameters(model: type[BaseModel], skip: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Parameter name (as a pipeline writes it: a field's alias if it has one), type, default (or
    ``required``) and description of a pydantic model, for ``stele stages`` and the type listings."""
    rows = []
    for name, f in model.model_fields.items():
        if name in skip:
            continue
        default = "required" if f.is_required() else f.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = default.model_dump(mode="json")
        rows.append({
            "name": f.alias or name,
            "type": type_name(f.annotation),
            "default": default,
            "description": f.description or "",
        })
    return rows


@dataclass
class Registry(Generic[T]):
    """Named things (stage types, knowledge sources, datasets) plus the plugins of one entry-point
    group. ``qualname(item)`` identifies where an item was defined, so that re-importing the same
    module (Ray workers do) is not mistaken for a clash."""

    group: str = ENTRY_POINT_GROUP
    kind: str = "stage type"
    qualname: Callable[[Any], str] = lambda item: item.qualname  # noqa: E731
    types: dict[str, T] = field(default_factory=dict)
    plugin_errors: dict[str, str] = field(default_factory=dict)
    _loaded: bool = False

    def register(self, name: str, item: T) -> T:
        old = self.types.get(name)
        if old is not None and self.qualname(old) != self.qualname(item):
            warnings.warn(f"{self.kind} {name!r} from {self.qualname(old)} is overwritten by "
                          f"{self.qualname(item)}", stacklevel=3)
        self.types[name] = item
        return item

    def load_plugins(self) -> None:
        """Import every module of the entry-point group (once).

        A broken plugin must not take the engine down: its error is kept and shown when a name it
        might have provided is asked for.
        """
        if self._loaded:
            return
        self._loaded = True
        for ep in importlib.metadata.entry_points(group=self.group):
            try:
                ep.load()
            except Exception as e:  # noqa: BLE001 - any import error of third-party code
                self.plugin_errors[f"{ep.name} = {ep.value}"] = f"{type(e).__name__}: {e}"

    def get(self, name: str) -> T:
        self.load_plugins()
        try:
            return self.types[name]
        except KeyError:
            raise KeyError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        msg = f"unknown {self.kind} {name!r}"
        close = difflib.get_close_matches(name, list(self.types), n=3)
        if close:
            msg += f" (did you mean {', '.join(map(repr, close))}?)"
        else:
            msg += f"; known: {', '.join(sorted(self.types)) or 'none'}"
        if self.plugin_errors:
            msg += "; plugins that failed to load: " + "; ".join(
                f"{k} ({v})" for k, v in self.plugin_errors.items())
        return msg

    def all(self) -> dict[str, T]:
        self.load_plugins()
        return dict(sorted(self.types.items()))


REGISTRY: Registry[StageType] = Registry()


def _params_model(fn: Callable[..., Any]) -> type[BaseModel]:
    sig = inspect.signature(fn)
    args = list(sig.parameters.values())
    if len(args) < 2:
        return NoParams
    hints = typing.get_type_hints(fn)
    model = hints.get(args[1].name)
    if not (inspect.isclass(model) and issubclass(model, BaseModel)):
        raise TypeError(f"stage function {fn.__qualname__}: annotate its second argument with a "
                        f"pydantic model (got {model!r})")
    return model


def _input_roles(name: str, inputs: Mapping[str, Input] | None) -> dict[str, Input] | None:
    if inputs is None:
        return None
    if not isinstance(inputs, Mapping):
        raise TypeError(f"stage type {name!r}: inputs is a mapping role -> Input, got {inputs!r}")
    for role, spec in inputs.items():
        if not isinstance(role, str) or not role.isidentifier():
            raise ValueError(f"stage type {name!r}: input role {role!r} must be an identifier")
        if not isinstance(spec, Input):
            raise TypeError(f"stage type {name!r}: input role {role!r} must be an Input(...), "
                            f"got {spec!r}")
    return dict(inputs)


def stage(name: str, *, version: str = "1", cpus: float = 1.0, gpus: float = 0.0,
          pool: str | None = None, fingerprint: Callable[[Any], Any] | None = None,
          headline: tuple[str, ...] = (), inputs: Mapping[str, Input] | None = None,
          loader: Callable[[Path], Any] | None = None,
          registry: Registry | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn(ctx, params)`` as stage type ``name`` (see the module docstring)."""
    if not _valid_type_name(name):
        raise ValueError(f"stage type name {name!r} must be dotted identifiers, e.g. 'acme.embed'")
    roles = _input_roles(name, inputs)

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        doc = inspect.getdoc(fn) or ""
        st = StageType(
            name=name, fn=fn, params=_params_model(fn), version=str(version),
            resources=Resources(cpus=cpus, gpus=gpus, pool=pool), description=" ".join(doc.split("\n\n")[0].split()),
            fingerprint=fingerprint, headline=tuple(headline), inputs=roles, loader=loader)
        (registry or REGISTRY).register(name, st)
        return fn

    return deco


HEADLINE_FALLBACK = 6   # metrics shown when the stage type names no headline metrics


def headline_keys(metrics: Mapping[str, Any], type_name: str = "",
                  limit: int = HEADLINE_FALLBACK) -> list[str]:
    """The headline metrics of a stage, as the run summary and the report pick them: those its
    type names (``headline=`` of :func:`stage`, fnmatch patterns), else its first ``limit`` numbers
    and strings (booleans are flags, not results). A metric without a value (None) is kept: a
    by-type table's columns stay in the type's order when only some stages have it."""
    from fnmatch import fnmatchcase

    try:
        wanted = REGISTRY.get(type_name).headline if type_name else ()
    except KeyError:  # a record of a stage type no longer installed
        wanted = ()
    keys = [k for k, v in metrics.items()
            if v is None or isinstance(v, str) or (isinstance(v, (int, float)) and not isinstance(v, bool))]
    if not wanted:
        return keys[:limit]
    return list(dict.fromkeys(k for pat in wanted for k in keys if fnmatchcase(k, pat)))
