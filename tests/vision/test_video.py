"""Video: decoding and frame sampling of tiny generated clips, bad files rejected with a reason, the
``video_folder`` listing, and ``vision.video_features`` end to end (frames as regions over time, each
frame's features equal to the image featurizer's on the same decoded frame)."""

from __future__ import annotations

import csv
import io
import json
import logging
import wave
from pathlib import Path

import av
import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image
from safetensors.torch import save_file

from pipeline.context import StageContext
from pipeline.datasets import build_dataset
from pipeline.features import FeatureSet
from pipeline.quarantine import Quarantine
from pipeline.registry import Resources
from vision.io import MediaError
from vision.video import decode_video, sample_times
from vision.video_stage import VideoFeaturesParams, video_features

LEVELS = [20, 60, 100, 140, 180, 220, 40, 200]  # frame i is a flat grey of LEVELS[i]: identifiable


def make_clip(path: Path, n: int = 6, rate: int = 8, size: int = 32, *, faststart: bool = False,
              seed: int | None = None) -> Path:
    """An mpeg4 .mp4 of ``n`` frames at ``rate`` fps: flat greys (or seeded noise with ``seed``)."""
    opts = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=opts) as c:
        s = c.add_stream("mpeg4", rate=rate)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(n):
            a = (np.full((size, size, 3), LEVELS[i % len(LEVELS)], np.uint8) if seed is None else
                 np.random.default_rng(seed + i).integers(0, 256, (size, size, 3), np.uint8))
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def _level(img: Image.Image) -> int:
    """Which LEVELS entry a decoded frame shows (mpeg4 is lossy: the nearest)."""
    return int(np.argmin([abs(float(np.asarray(img).mean()) - v) for v in LEVELS]))


# decoding and sampling

@pytest.mark.parametrize("fps,max_frames,overflow,frames,rate,capped", [
    (8, 32, "spread", [0, 1, 2, 3, 4, 5], 8, False),                  # the source's own rate
    (4, 32, "spread", [0, 2, 4], 4, False),                           # every other frame
    (16, 32, "spread", [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5], 16, False),  # faster than the source
    (3, 32, "spread", [0, 2, 5], 3, False),                           # t = 0, 1/3, 2/3 s
    (8, 3, "spread", [0, 2, 4], 4, True),                             # capped: rate 3 / 0.75 s
    (8, 2, "truncate", [0, 1], 8, True),                              # capped: the first 2 / 8 s
])
def test_decode_samples_the_frame_on_screen_at_each_sample_time(tmp_path, fps, max_frames, overflow,
                                                                  frames, rate, capped):
    data = make_clip(tmp_path / "c.mp4").read_bytes()        # 6 frames at 8 fps: T = 0.75 s
    clip = decode_video(data, fps=fps, max_frames=max_frames, overflow=overflow)
    assert [_level(f) for f in clip.frames] == frames
    assert clip.rate == pytest.approx(rate) and clip.capped is capped
    assert clip.duration == pytest.approx(0.75) and clip.source_fps == pytest.approx(8)
    assert (clip.width, clip.height) == (32, 32)
    # frames decoded up to the last one kept (a capped clip stops there), not the one after it
    assert clip.source_frames == (frames[-1] + 1 if capped else 6)
    t = np.arange(len(frames)) / rate
    np.testing.assert_allclose(clip.starts, t)
    np.testing.assert_allclose(clip.ends, np.minimum(t + 1 / rate, 0.75))
    np.testing.assert_allclose(clip.starts, sample_times(0.75, fps, max_frames, overflow))
    boxes = clip.boxes()
    assert boxes.dtype == np.float32 and boxes.shape == (len(frames), 4)
    np.testing.assert_allclose(boxes[:, 0], t / 0.75, atol=1e-6)
    np.testing.assert_allclose(boxes[:, 2], np.minimum(t + 1 / rate, 0.75) / 0.75, atol=1e-6)
    assert (boxes[:, 1] == 0).all() and (boxes[:, 3] == 1).all()
    if overflow == "spread":  # the spans tile the clip: contiguous, in order, [0, 1)
        assert boxes[0, 0] == 0 and boxes[-1, 2] == pytest.approx(1)
        np.testing.assert_allclose(boxes[1:, 0], boxes[:-1, 2], atol=1e-6)


@pytest.mark.parametrize("fmt,codec,suffix", [("mp4", "libx264", "mp4"), ("matroska", "mpeg4", "mkv"),
                                              ("webm", "libvpx-vp9", "webm"), ("avi", "mjpeg", "avi")])
def test_other_containers_and_codecs_sample_the_same_frames(tmp_path, fmt, codec, suffix):
    """H.264 with B-frames (reordered, an MP4 edit list), Matroska and WebM (no frame count), AVI."""
    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV build has no {codec} encoder")
    path = tmp_path / f"c.{suffix}"
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=8)
        s.width = s.height = 32
        s.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for i in range(6):
            a = np.full((32, 32, 3), LEVELS[i], np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    clip = decode_video(path.read_bytes(), fps=4, max_frames=32)
    assert [_level(f) for f in clip.frames] == [0, 2, 4] and clip.source_frames == 6
    assert clip.duration == pytest.approx(0.75)
    np.testing.assert_allclose(clip.starts, [0, 0.25, 0.5])


def _wav() -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\0\1" * 800)
    return buf.getvalue()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, "PNG")
    return buf.getvalue()


def bad_files(tmp_path: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, the reason the decoder must give)."""
    plain = make_clip(tmp_path / "plain.mp4", 16, seed=1).read_bytes()        # index at the end
    fast = make_clip(tmp_path / "fast.mp4", 16, seed=1, faststart=True).read_bytes()  # index first
    return {
        "empty.mp4": (b"", "empty file"),
        "text.mp4": (b"this is not a video at all", "FFmpeg cannot open it"),
        "cut_index.mp4": (plain[: len(plain) // 2], "FFmpeg cannot open it"),
        "cut_data.mp4": (fast[: int(len(fast) * 0.8)], "truncated video: the container declares 16"),
        "still.mp4": (_png(), "a still image"),
        "sound.mp4": (_wav(), "no video stream (streams: audio)"),
    }


def test_bad_files_raise_media_error_with_the_reason(tmp_path):
    for name, (data, reason) in bad_files(tmp_path).items():
        with pytest.raises(MediaError, match=reason.replace("(", r"\(").replace(")", r"\)")):
            decode_video(data)
    with pytest.raises(MediaError, match="over max_pixels"):
        decode_video(make_clip(tmp_path / "c.mp4").read_bytes(), max_pixels=32 * 32 - 1)


@pytest.mark.parametrize("fmt", ["GIF", "PNG"])
def test_an_animated_gif_or_apng_is_a_video_and_a_one_frame_one_a_still_image(fmt):
    """TGIF-style sets are animated GIFs: FFmpeg opens them with an image demuxer, yet with more
    than one frame they are videos, sampled like any other; with one frame, a still image."""
    frames = [Image.new("RGB", (16, 16), (LEVELS[i],) * 3) for i in range(6)]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=200, loop=0)
    clip = decode_video(buf.getvalue(), fps=5, max_frames=32)      # 6 frames of 0.2 s: T = 1.2 s
    assert [_level(f) for f in clip.frames] == [0, 1, 2, 3, 4, 5] and clip.source_frames == 6
    assert clip.duration == pytest.approx(1.2)
    one = io.BytesIO()
    frames[0].save(one, fmt)
    with pytest.raises(MediaError, match=r"a still image \((gif|apng|png_pipe)"):
        decode_video(one.getvalue())


def test_a_capped_clip_decodes_only_what_it_keeps(tmp_path):
    """Truncate mode stops at the last kept frame: a file cut after it still gives its beginning."""
    fast = make_clip(tmp_path / "fast.mp4", 16, seed=1, faststart=True).read_bytes()
    clip = decode_video(fast[: int(len(fast) * 0.8)], fps=8, max_frames=2, overflow="truncate")
    assert len(clip.frames) == 2 and clip.capped and clip.duration == pytest.approx(2.0)


# the dataset

def test_video_folder_lists_captions_splits_and_quarantines_like_image_folder(tmp_path):
    make_clip(tmp_path / "a.mp4")
    (tmp_path / "sub").mkdir()
    make_clip(tmp_path / "sub" / "b.mp4", 3)
    cap = tmp_path / "captions.csv"
    cap.write_text("video,caption,split\n"
                   "a.mp4,a grey square getting lighter,train\n"
                   "./a.mp4,a second caption,train\n"
                   "sub/b.mp4,a short clip,test\n"
                   "sub/b.mp4,the same clip in another split,train\n"
                   "gone.mp4,a clip that is not there,train\n")
    ds = build_dataset({"type": "video_folder", "captions": str(cap)})
    assert ds.modality == "video"
    q = Quarantine(ds.type, ds.on_error)
    items = list(ds.items(q))
    assert [(i.id, i.texts, i.meta) for i in items] == [
        ("a.mp4", ["a grey square getting lighter", "a second caption"], {"split": "train"}),
        ("sub/b.mp4", ["a short clip"], {"split": "test"})]
    reasons = [(e["where"].rsplit(":", 1)[1], e["reason"]) for e in q.summary()["examples"]]
    assert reasons[0][0] == "5" and "split 'train' differs from 'test'" in reasons[0][1]
    assert reasons[1] == ("6", "video file not found")
    assert ds.load("sub/b.mp4") == (tmp_path / "sub" / "b.mp4").read_bytes()
    with pytest.raises(OSError, match="cannot read video"):
        ds.load("gone.mp4")
    # jsonl and another column name, as image_folder
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"clip": "a.mp4", "caption": ["one", "two"]}) + "\n")
    ds = build_dataset({"type": "video_folder", "captions": str(jl), "video_column": "clip"})
    assert [i.texts for i in ds.items(Quarantine(ds.type, "raise"))] == [["one", "two"]]


def test_stage_params_refuse_the_other_modality(tmp_path):
    (tmp_path / "c.csv").write_text("video,caption\n")
    with pytest.raises(ValueError, match="holds video items, not image items"):
        from vision.stages import VisionFeaturesParams
        VisionFeaturesParams.model_validate(
            {"dataset": {"type": "video_folder", "captions": str(tmp_path / "c.csv")}})
    with pytest.raises(ValueError, match="holds image items, not video items"):
        VideoFeaturesParams.model_validate(
            {"dataset": {"type": "image_folder", "captions": str(tmp_path / "c.csv")}})


# the stage

@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    path = tmp_path_factory.mktemp("weights") / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


GOOD = {"a.mp4": (6, 8), "b.mp4": (3, 4), "c.mp4": (8, 8)}  # name -> (frames, fps)


def test_stage_writes_frames_as_regions_over_time(ray_local, tmp_path, weights):
    root = tmp_path / "videos"
    root.mkdir()
    for k, (name, (n, rate)) in enumerate(GOOD.items()):
        make_clip(root / name, n, rate, seed=10 * k)
    bad = bad_files(tmp_path)
    for name in ("text.mp4", "cut_index.mp4", "sound.mp4"):
        (root / name).write_bytes(bad[name][0])
    with open(root / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "caption"])
        for name in [*GOOD, "text.mp4", "cut_index.mp4", "sound.mp4", "missing.mp4"]:
            w.writerow([name, f"a clip called {name}"])
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(stage="vv", key="k", out=out, inputs={}, resources=Resources(),
                       state_uri=str(tmp_path / "state"), log=logging.getLogger("test.vv"))
    params = VideoFeaturesParams.model_validate({
        "dataset": {"type": "video_folder", "captions": str(root / "captions.csv")},
        "weights": str(weights), "fps": 4, "max_frames": 3, "batch_size": 2, "actors": 1,
        "frame_batch": 4})
    metrics = video_features(ctx, params)
    (out / "manifest.json").write_text(json.dumps({"metrics": metrics,
                                                   "params": params.model_dump(mode="json")}))
    # a: 0.75 s at 4 fps = 3 frames; b: 0.75 s at 4 fps = 3; c: 1 s -> 4 > 3: spread at 3 fps
    assert metrics["items"] == 3 and metrics["dim"] == 1280 and metrics["frames"] == 9
    assert metrics["fps"] == 4 and metrics["max_frames"] == 3 and metrics["clips_capped"] == 1
    assert metrics["frames_per_clip"] == 3.0 and metrics["frames_min"] == metrics["frames_max"] == 3
    assert metrics["video_seconds"] == pytest.approx(0.75 + 0.75 + 1.0, abs=1e-6)
    assert metrics["videos_quarantined"] == 3 and metrics["listing_rejected"] == 1
    assert metrics["regions"] == 3 * (1 + 3)

    fs = FeatureSet(out)
    got = fs.load()
    model = timm.create_model("tf_efficientnet_lite0", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(weights))).eval()
    tf = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    for name in GOOD:
        feats, boxes = got[name]
        clip = decode_video((root / name).read_bytes(), fps=4, max_frames=3)
        with torch.inference_mode():  # the image featurizer's pooled vector, frame by frame
            ref = model.forward_head(model.forward_features(
                torch.stack([tf(im) for im in clip.frames])), pre_logits=True).numpy()
        assert feats.shape == (4, 1280) and boxes.shape == (4, 4)
        np.testing.assert_allclose(feats[1:].astype(np.float32), ref, rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(feats[0].astype(np.float32), ref.mean(0), rtol=2e-3, atol=2e-3)
        np.testing.assert_array_equal(boxes[0], [0, 0, 1, 1])
        np.testing.assert_allclose(boxes[1:], clip.boxes(), atol=1e-6)
        assert (np.diff(boxes[1:, 0]) > 0).all() and boxes[-1, 2] == pytest.approx(1)  # time order
    # frames differ (seeded noise), so equal features in the reference's order are the time order
    assert not np.allclose(got["a.mp4"][0][1], got["a.mp4"][0][2], atol=1e-2)

    rejected = {r["where"]: r for r in fs.rejected().to_pylist()}
    for name in ("text.mp4", "cut_index.mp4", "sound.mp4"):
        assert bad[name][1] in rejected[name]["reason"] and rejected[name]["kind"] == "media"
    assert "missing.mp4" in str([r for r in rejected.values() if r["kind"] == "listing"])


# the synthetic emoji video set

def test_make_emoji_videos_is_seeded_holds_out_whole_emoji_and_reverses_opposites(tmp_path):
    import subprocess
    import sys

    src = tmp_path / "emoji"
    (src / "img").mkdir(parents=True)
    entries = []
    for k, (name, colour) in enumerate([("Red Apple", "red"), ("Blue Heart", "blue"),
                                        ("Orange", "orange"), ("Green Book", "green"), ("Cat", "black")]):
        im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
        im.paste(Image.new("RGBA", (40, 24), colour), (12, 20))  # not symmetric: rotation shows
        im.save(src / "img" / f"e{k}.png")
        entries.append({"unified": f"E{k}", "name": name, "image": f"e{k}.png"})
    entries.append({"unified": "E9", "name": "No Image", "image": "missing.png"})
    (src / "emoji.json").write_text(json.dumps(entries))
    script = Path(__file__).parents[2] / "bench" / "make_emoji_videos.py"
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        subprocess.run([sys.executable, str(script), str(src), "--out", str(out), "--frames", "7",
                        "--size", "32", "--test-share", "0.4", "--val-share", "0.2"],
                       check=True, capture_output=True, text=True, timeout=600)
        outs.append(out)
    rows = list(csv.DictReader(open(outs[0] / "captions.csv", encoding="utf-8")))
    assert len(rows) == 5 * 8
    assert {r["caption"] for r in rows if r["emoji"] == "E0"} >= {
        "a red apple moving to the left", "a red apple rotating anticlockwise"}
    assert "an orange zooming out" in {r["caption"] for r in rows}
    split_of = {}
    for r in rows:  # every clip of an emoji is in its emoji's split
        assert split_of.setdefault(r["emoji"], r["split"]) == r["split"]
    assert sorted(split_of.values()) == ["test", "test", "train", "train", "val"]
    info = json.loads((outs[0] / "make.json").read_text())
    assert info["emoji_skipped_no_image"] == 1 and info["clips"] == 40
    for r in rows:  # the same bytes from a second run
        assert (outs[0] / r["video"]).read_bytes() == (outs[1] / r["video"]).read_bytes()
    # the opposite motion is the same frames in reverse order
    for fwd, rev in (("left", "right"), ("up", "down"), ("zoom_in", "zoom_out"),
                     ("clockwise", "anticlockwise")):
        # every frame (8 fps), and the frames the pipeline samples (4 fps: every other one): in
        # both, the twin's frames are the clip's in reverse order, so only order tells them apart
        for fps, n in ((8, 7), (4, 4)):
            a = decode_video((outs[0] / f"clips/E1_{fwd}.mp4").read_bytes(), fps=fps, max_frames=16)
            b = decode_video((outs[0] / f"clips/E1_{rev}.mp4").read_bytes(), fps=fps, max_frames=16)
            fa = np.stack([np.asarray(f, np.float32) for f in a.frames])
            fb = np.stack([np.asarray(f, np.float32) for f in b.frames])
            assert len(fa) == n and np.abs(fa - fb[::-1]).mean() < 4          # lossy codec: close
            assert np.abs(fa - fb).mean() > 3 * np.abs(fa - fb[::-1]).mean()  # and not the same order
    bad = subprocess.run([sys.executable, str(script), str(src), "--out", str(tmp_path / "bad"),
                          "--frames", "6"], capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "other frames from a clip's reverse" in bad.stderr


def test_frame_order_ablation_moves_features_and_keeps_boxes(tmp_path, weights):
    """The actor in this process (no Ray): shuffled / reversed permute the frame features, boxes stay
    in time order and the mean frame is unchanged."""
    import pyarrow as pa

    from pipeline.features import unpack_rows
    from vision.video_stage import VideoFeaturizeActor, frame_permutation

    assert frame_permutation("x", 5, "time").tolist() == [0, 1, 2, 3, 4]
    assert frame_permutation("x", 5, "reversed").tolist() == [4, 3, 2, 1, 0]
    perms = {i: frame_permutation(i, 8, "shuffled", 3).tolist() for i in ("a", "b", "c")}
    assert all(sorted(p) == list(range(8)) for p in perms.values())
    assert perms == {i: frame_permutation(i, 8, "shuffled", 3).tolist() for i in perms}  # seeded
    assert len({tuple(p) for p in perms.values()}) > 1 and perms["a"] != list(range(8))

    make_clip(tmp_path / "a.mp4", 8, 8, seed=5)
    (tmp_path / "c.csv").write_text("video,caption\na.mp4,noise\n")
    batch = pa.table({"id": ["a.mp4"], "media": ["a.mp4"]})
    out = {}
    for order in ("time", "shuffled", "reversed"):
        p = VideoFeaturesParams.model_validate({
            "dataset": {"type": "video_folder", "captions": str(tmp_path / "c.csv")},
            "weights": str(weights), "fps": 8, "max_frames": 8, "frame_order": order})
        t = VideoFeaturizeActor(p, "cpu", 1)(batch)
        assert t["error"].to_pylist() == [None]
        out[order] = (unpack_rows(t["features"].chunk(0), np.dtype(np.float16), 1280)[0],
                      unpack_rows(t["boxes"].chunk(0), np.dtype(np.float32), 4)[0])
    feats, boxes = out["time"]
    for order in ("shuffled", "reversed"):
        f, b = out[order]
        np.testing.assert_array_equal(b, boxes)
        np.testing.assert_array_equal(f[1:], feats[1:][frame_permutation("a.mp4", 8, order)])
        np.testing.assert_allclose(f[0].astype(np.float32), feats[0].astype(np.float32), atol=1e-3)


def test_a_backbone_that_cannot_be_built_is_one_line_naming_the_video_stage(tmp_path: Path) -> None:
    """The shared backbone builder names the stage that asked (not vision.features)."""
    from pipeline import StageFailed
    from vision.stages import build_backbone
    from vision.video_stage import VideoFeaturesParams

    (tmp_path / "captions.csv").write_text("video,caption\n")
    p = VideoFeaturesParams.model_validate({
        "dataset": {"type": "video_folder", "captions": str(tmp_path / "captions.csv")},
        "backbone": "no_such_model_xyz"})
    with pytest.raises(StageFailed, match=r"^vision.video_features: backbone 'no_such_model_xyz'"):
        build_backbone(p, "vision.video_features")
