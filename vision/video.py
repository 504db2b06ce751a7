"""Video datasets and decoding: a folder of video files plus captions, and frames sampled at a set rate,
each with the time span it stands for.

* ``video_folder``: video files under ``root`` named by a captions file, with the conventions of
  ``image_folder`` (:mod:`vision.datasets`): CSV/TSV with a header or JSON lines, several rows for one
  file are several captions, an optional ``split`` column (a later row giving the same file another
  split is quarantined), other columns become the item's meta::

      video,caption,split
      clips/0001.mp4,a red apple moving to the left,train

Listing only checks that each file exists; :meth:`VideoFolder.load` returns the encoded bytes and the
feature stage decodes them with :func:`decode_video` (PyAV, the FFmpeg libraries inside its wheel), so a
file that cannot be used is a rejected row with its reason, counted in the manifest, never a crash.

Frame sampling. Decoded frames are put on a clock that starts at the first frame (``t = pts - pts_0``,
seconds); a frame is on screen from its time until the next frame's, and the clip lasts
``T = end of the last frame`` (its time plus its duration, or ``1 / average rate`` when the container
gives none). Sample ``k`` is taken at ``t_k = k / r`` and is the frame on screen then; it stands for the
span ``[t_k, min(t_k + 1 / r, T))``, so the spans of a clip tile ``[0, T)`` in time order. ``r = fps``
unless the clip would give more than ``max_frames`` samples: ``overflow: spread`` then lowers ``r`` to
``max_frames / T`` (``T`` as the container declares it) so the samples still cover the whole clip,
``overflow: truncate`` keeps the first ``max_frames`` (the first ``max_frames / fps`` seconds). Decoding
stops after the frame on screen at the last sample time, so a long file costs only what is kept.
Spans become boxes ``(t_start / T, 0, t_end / T, 1)``, as speech frames do (:mod:`speech.features`).

Rejected, each with a one-line :class:`~vision.io.MediaError` reason: an empty file, bytes FFmpeg cannot
open (not a media file; also an MP4 cut before its index, which comes last unless written with
``faststart``), a file without a video stream (audio only), a still image (FFmpeg's image demuxers;
a GIF or APNG is a video when it has more than one frame), frames larger than ``max_pixels``, data
that fails to decode, a file with no decodable frame, and a file decoded to its end with fewer frames
than its container declares (truncated data that the decoder skipped without an error; a shortfall of
up to 2 frames or 1% is allowed, what an MP4 edit list may hide). A clip capped by ``max_frames`` in
``truncate`` mode is decoded only up to its last kept frame, so damage after that point goes
unnoticed: what is kept decoded cleanly.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from pipeline.datasets import dataset
from pipeline.uris import InputURI

from .datasets import CaptionedFolder
from .io import DEFAULT_MAX_PIXELS, MediaError

Overflow = Literal["spread", "truncate"]
_EPS = 1e-6  # seconds: sample times and frame starts closer than this are the same instant


@dataclass
class VideoClip:
    """Sampled frames of one video: ``frames`` (F PIL 8-bit RGB images, in time order), their spans
    ``starts`` / ``ends`` (F,) in seconds from the first frame, the clip's duration ``duration`` (T, s)
    and what the source said about itself."""

    frames: list[Any]
    starts: np.ndarray                 # (F,) seconds
    ends: np.ndarray                   # (F,) seconds
    duration: float                    # T, seconds
    rate: float                        # r, samples per second actually used
    source_frames: int                 # frames decoded (up to the last one kept)
    source_fps: float | None           # the stream's average frame rate, when it declares one
    width: int
    height: int
    capped: bool = False               # fewer samples than T * fps: max_frames applied

    def boxes(self) -> np.ndarray:
        """(F, 4) float32 ``(t_start / T, 0, t_end / T, 1)``, clipped to [0, 1]."""
        T = self.duration if self.duration > 0 else 1.0
        s = np.clip(self.starts / T, 0, 1)
        e = np.clip(self.ends / T, 0, 1)
        return np.stack([s, np.zeros_like(s), e, np.ones_like(s)], -1).astype(np.float32)


# FFmpeg demuxers that read a still image as a one-frame "video": not a video file.
_IMAGE_DEMUXERS = ("image2", "_pipe", "webp")
# Image formats that may be animated (TGIF-style GIF sets): a video when more than one frame decodes.
_ANIMATED_IMAGE_DEMUXERS = ("gif", "apng")


def _open(data: bytes) -> Any:
    import av

    if not data:
        raise MediaError("empty file (0 bytes)")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise MediaError(f"FFmpeg cannot open it: not a media file, or truncated ({len(data)} bytes, "
                         f"starts {data[:8]!r}: {type(e).__name__})") from None
    fmt = container.format.name or ""
    if any(k in fmt for k in _IMAGE_DEMUXERS):
        container.close()
        raise MediaError(f"a still image ({fmt}), not a video")
    if not container.streams.video:
        kinds = [s.type for s in container.streams]
        container.close()
        raise MediaError(f"no video stream (streams: {', '.join(kinds) or 'none'})")
    return container


def _declared_duration(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:  # microseconds
        return container.duration / 1e6
    return None


def decode_video(data: bytes, *, fps: float = 2.0, max_frames: int = 32, overflow: Overflow = "spread",
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> VideoClip:
    """Frames of the encoded video ``data`` sampled as the module docstring says, or :class:`MediaError`.

    ``fps`` > 0 is the sampling rate, ``max_frames`` >= 1 the cap on samples per clip."""
    import av

    if fps <= 0 or max_frames < 1:
        raise ValueError(f"fps must be > 0 and max_frames >= 1 (got {fps}, {max_frames})")
    container = _open(data)
    try:
        stream = container.streams.video[0]
        w, h = stream.codec_context.width, stream.codec_context.height
        if w and h and w * h > max_pixels:
            raise MediaError(f"{w}x{h} = {w * h} pixels per frame is over max_pixels={max_pixels}")
        src_fps = float(stream.average_rate) if stream.average_rate else None
        rate = fps
        declared = _declared_duration(container, stream)
        if overflow == "spread" and declared and declared * fps > max_frames:
            rate = max_frames / declared
        clip, ended = _sample(container, stream, rate, fps, max_frames, max_pixels, src_fps, av)
        fmt = container.format.name or ""
        if ended and clip.source_frames < 2 and any(k in fmt for k in _ANIMATED_IMAGE_DEMUXERS):
            raise MediaError(f"a still image ({fmt} with one frame), not a video")
        return clip
    finally:
        container.close()


def _sample(container: Any, stream: Any, rate: float, fps: float, max_frames: int, max_pixels: int,
            src_fps: float | None, av: Any) -> tuple[VideoClip, bool]:
    """Decode ``stream`` up to the last sample time: the clip of the frames on screen at
    ``t_k = k / rate``, and whether decoding reached the stream's end."""
    picked: list[Any] = []       # the frame on screen at t_k, for k = 0, 1, ...
    decoded = 0
    t0 = prev = prev_end = None
    reached_end = True
    try:
        for frame in container.decode(stream):
            t = frame.time if frame.time is not None else decoded / (src_fps or fps)
            t0 = t if t0 is None else t0
            t -= t0
            if t < 0:  # a frame presented before the first one decoded (reordering at the start)
                t = 0.0
            if prev is None and frame.width * frame.height > max_pixels:  # no size in the header
                raise MediaError(f"{frame.width}x{frame.height} pixels per frame is over "
                                 f"max_pixels={max_pixels}")
            # Every sample time before this frame's start shows the previous frame (a sample time
            # within a microsecond of a frame's start, a rounding error, shows the new frame).
            while prev is not None and len(picked) < max_frames and len(picked) / rate < t - _EPS:
                picked.append(prev)
            if len(picked) >= max_frames:
                reached_end = False  # this frame comes after the last sample: stop decoding
                break
            decoded += 1
            step = (float(frame.duration * frame.time_base) if frame.duration and frame.time_base
                    else 1.0 / (src_fps or fps))
            prev, prev_end = frame, t + step
    except av.error.FFmpegError as e:
        raise MediaError(f"truncated or corrupt video data after {decoded} frame(s) "
                         f"({type(e).__name__}: {e})") from None
    if prev is None:
        raise MediaError("no decodable frame")
    # An MP4 edit list may hide a frame or two of encoder delay that the container still counts.
    if reached_end and stream.frames and decoded < stream.frames - max(2, stream.frames // 100):
        raise MediaError(f"truncated video: the container declares {stream.frames} frames, "
                         f"{decoded} decode")
    n = len(picked)
    if reached_end:  # the remaining sample times inside the clip show the last frame
        while len(picked) < max_frames and len(picked) / rate < prev_end - _EPS:
            picked.append(prev)
        n, duration = len(picked), prev_end
        capped = n * 1.0 < prev_end * fps - 1e-9
    else:  # stopped at the frame after the last sample: the rest of the clip is as declared
        declared = _declared_duration(container, stream)
        duration = max(declared or 0.0, n / rate)
        capped = declared is None or math.ceil(declared * fps - 1e-9) > max_frames
    starts = np.arange(n, dtype=np.float64) / rate
    ends = np.minimum(starts + 1.0 / rate, duration)
    # Several samples may show one frame (a source slower than ``rate``): convert each once.
    images: dict[int, Any] = {}
    for f in picked:
        if id(f) not in images:
            images[id(f)] = f.to_image()  # 8-bit RGB PIL image
    frames = [images[id(f)] for f in picked]
    w, h = frames[0].size
    return VideoClip(frames, starts, ends, float(duration), rate, decoded, src_fps, w, h,
                     capped=capped), reached_end


@dataset("video_folder")
class VideoFolder(CaptionedFolder):
    """Videos under ``root`` named by a captions file (any container and codec FFmpeg reads: MP4,
    WebM, MKV, AVI, ...).

    The captions file is read exactly as ``image_folder``'s: CSV (``,``, quoted fields may span lines)
    or TSV (tab) with a header naming ``video_column`` and ``caption_column``, or JSON lines whose
    ``caption_column`` is a string or a list of strings. Paths are relative to ``root``; rows naming
    the same video add captions to it; item id = the normalised relative path; the other columns of a
    video's first row are its meta; a ``split`` column is the video's split (``meta["split"]``), and
    a later row giving the same video another split is quarantined.
    """

    modality: ClassVar[str] = "video"
    kind: ClassVar[str] = "video"
    root: InputURI | None = Field(default=None, description="videos folder (default: the captions "
                                                            "file's folder)")
    video_column: str = "video"


def sample_times(duration: float, fps: float, max_frames: int, overflow: Overflow = "spread") -> np.ndarray:
    """The sample times ``t_k`` (seconds) :func:`decode_video` uses for a clip of ``duration`` seconds:
    a reference for tests and for consumers that want to know the schedule without decoding."""
    rate = max_frames / duration if overflow == "spread" and duration * fps > max_frames else fps
    n = min(max_frames, max(1, math.ceil((duration - _EPS) * rate)))
    return np.arange(n, dtype=np.float64) / rate

