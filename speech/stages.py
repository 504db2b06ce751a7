"""``speech.features``: frame features of every clip of an audio dataset, on Ray Data.

Same execution and output layout as ``vision.features`` (:mod:`pipeline.features`): the dataset is
listed once, ``(id, media)`` references stream through Ray Data actors that read (soundfile), check,
resample and featurize each clip (:mod:`speech.io`, :mod:`speech.features`), and the results stream
back into feature shards; every unusable clip or empty transcript is a row of ``rejected.parquet``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from pipeline import StageContext, StageFailed, stage
from pipeline.feature_stage import FeatureStageParams, extract
from pipeline.features import FeatureSet, region_schema, region_table, usable
from pipeline.fingerprint import files_fingerprint
from pipeline.ray_utils import tune_malloc

from .datasets import SpokenCaptions
from .io import AudioError, decode_audio

AUDIO_COLUMNS = [("duration_s", pa.float32()), ("source_rate", pa.int32()), ("channels", pa.int32())]


class SpeechFeaturesParams(FeatureStageParams):
    modality: ClassVar[str] = "audio"
    modality_hint: ClassVar[str] = (" (wrap an image-text set in spoken_captions to hear its "
                                    "captions)")
    features: Literal["logmel", "ssl"] = Field(
        default="logmel", description="log-mel filterbank, or a wav2vec2/HuBERT/WavLM encoder")
    sample_rate: int = Field(default=16000, ge=1000, description="clips are resampled to this rate")
    n_mels: int = Field(default=80, ge=1)
    win_ms: float = Field(default=25.0, gt=0)
    hop_ms: float = Field(default=10.0, gt=0)
    target_rate_hz: float | None = Field(
        default=None, gt=0, description="log-mel frame stacking to about this many frames per "
                                        "second (stack = round(1000 / hop_ms / rate))")
    encoder: str = Field(default="wav2vec2_base", description="torchaudio architecture (features: ssl)")
    encoder_config: dict[str, Any] | None = Field(
        default=None, description="arguments of torchaudio's wav2vec2_model, for custom sizes")
    weights: str | None = Field(default=None, description="local torchaudio state dict; none = "
                                                          "random (warns)")
    layer: int = Field(default=-1, description="which transformer layer's hidden states")
    normalize_waveform: bool = False
    global_token: bool = Field(default=True, description="the mean frame as region 0, span (0, 1)")
    min_peak: float = Field(default=1e-4, ge=0, description="quieter clips are rejected as silent")
    max_seconds: float | None = Field(default=600.0, gt=0,
                                      description="longer clips are rejected (bounded worker memory), "
                                                  "spoken captions before synthesis")
    batch_size: int = Field(default=64, ge=1, description="clips per Ray Data batch (each clip "
                                                          "is featurized alone)")

    @model_validator(mode="after")
    def _weights_exist(self) -> "SpeechFeaturesParams":
        if self.weights and not Path(self.weights).is_file():
            raise ValueError(f"weights: {self.weights} is not a file")
        return self

    @property
    def stack(self) -> int:
        if self.target_rate_hz is None:
            return 1
        return max(1, round(1000.0 / self.hop_ms / self.target_rate_hz))


def _fingerprint(p: SpeechFeaturesParams) -> list[Any]:
    fp: list[Any] = [p.dataset.fingerprint()]
    if p.weights:
        fp.append(files_fingerprint([Path(p.weights)]))
    return fp


def _featurizer(p: SpeechFeaturesParams, device: str = "cpu") -> Any:
    """What each actor builds, and what the stage process builds only to say why the actors could
    not (``extract``'s ``explain``)."""
    from .features import LogMel, SSLEncoder

    if p.features == "logmel":
        return LogMel(p.sample_rate, p.n_mels, p.win_ms, p.hop_ms, p.stack)
    if p.sample_rate != 16000:
        raise StageFailed("speech.features: wav2vec2-family encoders take 16 kHz audio; "
                          "set sample_rate: 16000")
    return SSLEncoder(p.encoder, p.weights, p.layer, p.normalize_waveform, device, p.encoder_config)


class AudioFeaturizeActor:
    """One Ray Data actor: its own featurizer; ``(id, media)`` batch in, frame rows out. Its output
    tables describe the featurizer (dim, weights warnings) for the manifest."""

    def __init__(self, params: SpeechFeaturesParams, device: str, threads: int):
        import torch

        from .features import with_global

        torch.set_num_threads(threads)
        tune_malloc()  # every batch reallocates the same activations: keep them mapped
        self.p, self.with_global = params, with_global
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # in ``fz.warnings``, which the stage logs once
            self.fz = _featurizer(params, device)
        self.schema = region_schema(self.fz.dim, AUDIO_COLUMNS,
                                    describe={"warnings": list(getattr(self.fz, "warnings", []))})

    def _load(self, media: str) -> Any:
        # Spoken captions are synthesised in load: with the length limit, a caption too long to
        # keep is refused there, unspoken, instead of being synthesised only to fail decode_audio.
        if isinstance(self.p.dataset, SpokenCaptions):
            return self.p.dataset.load(media, max_seconds=self.p.max_seconds)
        return self.p.dataset.load(media)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows: list[dict[str, Any]] = []
        clips, good = [], []
        for item_id, media in zip(batch["id"].to_pylist(), batch["media"].to_pylist()):
            try:
                clip = decode_audio(self._load(media), sample_rate=self.p.sample_rate,
                                    min_peak=self.p.min_peak, max_seconds=self.p.max_seconds)
            except (AudioError, OSError, ValueError) as e:
                rows.append({"id": item_id, "error": str(e) or type(e).__name__})
                continue
            clips.append(clip.samples)
            good.append({"id": item_id, "duration_s": clip.duration_s,
                         "source_rate": clip.source_rate, "channels": clip.channels, "error": None})
        for row, (frames, boxes) in zip(good, self.fz.many(clips) if clips else []):
            if self.p.global_token:
                frames, boxes = self.with_global(frames, boxes)
            rows.append({**row, "features": frames, "boxes": boxes})
        return region_table(self.schema, rows)


@stage("speech.features", version="3", cpus=0, fingerprint=_fingerprint,
       headline=("items", "rejected", "regions_per_item", "audio_seconds", "items_per_s"), inputs={},
       loader=FeatureSet)
def features(ctx: StageContext, params: SpeechFeaturesParams) -> dict:
    """Log-mel or wav2vec2/HuBERT frame features of an audio dataset, with time spans, on Ray Data."""
    resampled: dict[int, int] = {}
    seconds = 0.0

    def count_audio(out: pa.Table) -> None:
        nonlocal seconds
        ok = usable(out)
        for r in ok["source_rate"].to_pylist():
            if r != params.sample_rate:
                resampled[r] = resampled.get(r, 0) + 1
        seconds += sum(ok["duration_s"].to_pylist())

    counts = extract(ctx, params, AudioFeaturizeActor, stage_type="speech.features", desc="clips",
                     on_batch=count_audio, explain=lambda: _featurizer(params))
    built = counts.pop("described")
    frame_rate = (1000.0 / params.hop_ms / params.stack if params.features == "logmel"
                  else 16000 / 320)
    return {
        **counts, "dim": built["dim"],
        "resampled_from": {str(k): v for k, v in sorted(resampled.items())},
        "audio_seconds": seconds, "frame_rate_hz": frame_rate,
        "features": params.features, "stack": params.stack, "global_token": params.global_token,
        "weights": params.weights or ("n/a" if params.features == "logmel" else "random"),
        "warnings": built["warnings"],
    }
