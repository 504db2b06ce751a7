"""The feature settings a model was trained on, and the check that refuses features made otherwise.

A ``fusion.pretrain`` model reads region features; features made with another backbone, other
weights, another grid (so another number of regions), without the global token, or from audio at
another rate or frame layout are other inputs than the ones it learnt, even when their width is the
same. ``fusion.pretrain`` records the *feature-affecting* parameters of each feature input
(:func:`feature_record`) in ``recipe.json`` (``features: {media: ..., query_media: ...}``), and
``fusion.retrieval`` refuses a features artifact whose parameters differ
(:func:`check_feature_settings`), in one line naming both settings.

Only parameters that change the numbers count: batch sizes, actors, threads, limits, on_error, the
dataset and the rejection thresholds (``max_pixels``, ``min_peak``, ``max_seconds``) do not; nor do
the parameters a mode ignores (``grid`` outside ``mode: grid``; the log-mel parameters under
``features: ssl`` and the encoder's under ``features: logmel``). A model recorded before this
existed (no ``features`` in ``recipe.json``) is checked on its feature width only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The parameters of each feature stage type that change the features it writes.
FEATURE_SETTINGS: dict[str, tuple[str, ...]] = {
    "vision.features": ("backbone", "weights", "mode", "grid", "global_token", "crop_pct",
                        "crop_mode", "background"),
    "speech.features": ("features", "sample_rate", "n_mels", "win_ms", "hop_ms", "target_rate_hz",
                        "encoder", "encoder_config", "weights", "layer", "normalize_waveform",
                        "global_token"),
    "vision.video_features": ("backbone", "weights", "fps", "max_frames", "overflow", "global_token",
                              "frame_order", "shuffle_seed", "crop_pct", "crop_mode"),
}
_LOGMEL_ONLY = ("n_mels", "win_ms", "hop_ms", "target_rate_hz")
_SSL_ONLY = ("encoder", "encoder_config", "weights", "layer", "normalize_waveform")
# role in fusion.pretrain -> what the retrieval errors call it
ROLES = {"media": "media", "query_media": "query"}


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """An artifact folder's ``manifest.json`` (local or an fsspec URI); ``{}`` when it has none."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(folder))
    path = f"{root.rstrip('/')}/manifest.json"
    if not fs.exists(path):
        return {}
    with fs.open(path, "r") as f:
        return json.load(f)


def feature_settings(manifest: dict[str, Any]) -> dict[str, Any]:
    """The feature-affecting parameters of a feature artifact, from its manifest's ``type`` and
    ``params``: those of :data:`FEATURE_SETTINGS` that its ``params`` hold (every known one when the
    type is not recorded), less those its mode ignores. A local weights path is kept as its file
    name (:func:`_weights`)."""
    params = manifest.get("params") or {}
    kind = manifest.get("type")
    names = FEATURE_SETTINGS.get(kind) or tuple(dict.fromkeys(n for v in FEATURE_SETTINGS.values()
                                                                for n in v))
    out = {n: params[n] for n in names if n in params}
    if out.get("mode") not in (None, "grid"):
        out.pop("grid", None)       # patch and pooled ignore it
    if out.get("mode") == "pooled":
        out.pop("global_token", None)  # one pooled vector either way
    if "features" in out and kind != "vision.features":
        for n in _SSL_ONLY if out["features"] == "logmel" else _LOGMEL_ONLY:
            out.pop(n, None)
    if "weights" in out:
        out["weights"] = _weights(out["weights"])
    return out


def _weights(value: Any) -> Any:
    """A weights parameter as compared: a packaged source (``package:...``), hub name or URI as
    written; a local path by its file name, so the same file copied to another machine or folder
    matches (two different files of the same name are not told apart)."""
    if not isinstance(value, str) or ":" in value.split("/", 1)[0]:
        return value
    return Path(value).name


def feature_record(folder: str | Path, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``fusion.pretrain`` writes in ``recipe.json`` for one feature input: its stage type,
    artifact key and :func:`feature_settings`. ``manifest``: the artifact's, when the caller holds
    it (else read from ``folder``)."""
    manifest = manifest or read_manifest(folder)
    return {"type": manifest.get("type"), "key": manifest.get("key"),
            "settings": feature_settings(manifest)}


def artifact_name(folder: str | Path, manifest: dict[str, Any] | None = None) -> str:
    """An artifact as the user knows it, for messages: ``stage (key prefix)`` from its manifest,
    else its folder's name."""
    manifest = read_manifest(folder) if manifest is None else manifest
    stage, key = manifest.get("stage"), manifest.get("key")
    if stage and key:
        return f"{stage} ({key[:8]})"
    return Path(folder).name


def _show(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in settings.items())


def check_feature_settings(model_dir: Path, recipe: dict[str, Any], role: str,
                           folder: Path) -> None:
    """A ``ValueError`` (one line) when the features artifact ``folder`` was made with other
    feature settings than the model's ``role`` input (``media``, ``query_media``) was: another
    stage type, or any setting of :func:`feature_settings` that both record and that differs. Only
    what both sides record is compared: a model from before this check, or an artifact without
    parameters in its manifest, passes."""
    trained = (recipe.get("features") or {}).get(role)
    if not trained:
        return
    manifest = read_manifest(folder)
    what, here, model = ROLES.get(role, role), artifact_name(folder, manifest), artifact_name(model_dir)
    kind = manifest.get("type")
    if trained.get("type") and kind and kind != trained["type"]:
        raise ValueError(f"mismatched features: {what} artifact {here} is {kind}, model {model} was "
                         f"trained on {trained['type']} features")
    have, want = feature_settings(manifest), trained.get("settings") or {}
    differ = [k for k in want if k in have and have[k] != want[k]]
    if differ:
        raise ValueError(f"mismatched features: {what} artifact {here} was made with "
                         f"{_show({k: have[k] for k in differ})}, model {model} was trained on "
                         f"{_show({k: want[k] for k in differ})} ({kind or trained.get('type')}: "
                         f"make the features with the model's settings)")
