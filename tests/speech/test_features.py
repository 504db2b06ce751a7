"""speech.features: batched log-mel frames equal torchaudio's, clip by clip; the SSL encoder on a
GPU equals the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchaudio.transforms as T

from speech.features import LogMel, SSLEncoder

from .tiny import TINY_W2V

# shorter than a window, exactly one window, one sample more, a few seconds, an odd length
LENGTHS = [200, 400, 401, 48000, 19745, 16000, 12345]


def _clips() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in LENGTHS]


def _reference(x: np.ndarray, stack: int) -> np.ndarray:
    """torchaudio on this clip alone (zero-padded to one window when shorter), then stacked."""
    mel = T.MelSpectrogram(sample_rate=16000, n_fft=400, win_length=400, hop_length=160, n_mels=80,
                           center=False, power=2.0)
    t = torch.from_numpy(x)
    if t.numel() < 400:
        t = torch.nn.functional.pad(t, (0, 400 - t.numel()))
    frames = torch.log(mel(t) + 1e-6).T.numpy()
    if stack == 1:
        return frames
    if len(frames) < stack:
        return np.concatenate([frames, np.repeat(frames[-1:], stack - len(frames), 0)]).reshape(1, -1)
    k = len(frames) // stack * stack
    return frames[:k].reshape(k // stack, -1)


@pytest.mark.parametrize("stack", [1, 3])
@pytest.mark.parametrize("budget", [LogMel.MAX_BATCH_SAMPLES, 50000])
def test_many_equals_each_clip_alone(stack: int, budget: int, monkeypatch) -> None:
    """Clips of mixed lengths, batched (one group, or several under a small sample budget), give
    each clip's own frames, in input order, with spans that stay inside the clip."""
    monkeypatch.setattr(LogMel, "MAX_BATCH_SAMPLES", budget)
    lm = LogMel(stack=stack)
    clips = _clips()
    out = lm.many(clips)
    assert len(out) == len(clips)
    for x, (frames, boxes) in zip(clips, out):
        ref = _reference(x, stack)
        assert frames.shape == ref.shape == (len(boxes), 80 * stack)
        np.testing.assert_allclose(frames, ref, rtol=1e-5, atol=1e-4)
        # one frame per hop, spans normalised by the clip's duration
        assert boxes[0, 0] == 0 and (np.diff(boxes[:, 0]) > 0).all()
        assert boxes[:, 2].max() <= 1 or len(x) < 400
    single = lm(clips[3])
    np.testing.assert_array_equal(single[0], out[3][0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ssl_encoder_on_cuda_equals_cpu(tmp_path) -> None:
    """The same weights file on both devices: the GPU's frames (brought back as float32 numpy)
    equal the CPU's, with TF32 off so that the comparison is of placement, not precision."""
    from safetensors.torch import save_file

    with pytest.warns(UserWarning, match="RANDOM"):
        random = SSLEncoder("wav2vec2_model", config=TINY_W2V)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in random.model.state_dict().items()}, str(path))
    x = _clips()[3]  # 3 s
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            cpu = SSLEncoder("wav2vec2_model", str(path), config=TINY_W2V)(x)
            gpu = SSLEncoder("wav2vec2_model", str(path), device="cuda", config=TINY_W2V)(x)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    assert gpu[0].shape == cpu[0].shape
    np.testing.assert_allclose(gpu[0], cpu[0], atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(gpu[1], cpu[1])
