"""Frame features of speech, with time spans as "boxes" so fusion encoders treat frames like regions.

Two featurizers, one output shape (frames (T, D), spans (T, 4)):

- :class:`LogMel`: 80 log-mel bins over 25 ms windows every 10 ms (the usual ASR front end, e.g.
  Kaldi fbank / Whisper's settings at 16 kHz), optionally stacking ``stack`` consecutive frames into
  one (dimension 80 * stack, rate 100 / stack Hz) so the sequence is short enough for attention.
- :class:`SSLEncoder`: a torchaudio wav2vec 2.0 (Baevski et al. 2020) / HuBERT (Hsu et al. 2021) /
  WavLM architecture with local weights, one frame per 20 ms (receptive field 25 ms), the hidden
  states of one transformer layer.

Frame k spans ``[k * hop, k * hop + window)`` samples (no centre padding, so a span is exactly the
audio the frame saw); spans are normalised by the clip's duration and stored as the box
``(t_start / T, 0, t_end / T, 1)``. With a global token, region 0 is the mean frame with span (0, 1).
``LogMel`` featurizes a batch of clips in zero-padded transforms (exact: without centre padding a
frame reads only its clip's samples); ``SSLEncoder`` featurizes each clip alone, since padding a
batch would change wav2vec 2.0's group-normalised convolutions and so the features.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

# torchaudio factory functions an ``encoder:`` name may pick (a whitelist: configs never name code).
SSL_ARCHITECTURES = ("wav2vec2_base", "wav2vec2_large", "wav2vec2_large_lv60k", "hubert_base",
                     "hubert_large", "hubert_xlarge", "wavlm_base", "wavlm_large", "wav2vec2_model")


def spans_to_boxes(starts: np.ndarray, ends: np.ndarray, n_samples: int) -> np.ndarray:
    """Sample spans -> (T, 4) boxes ``(start/n, 0, end/n, 1)``, clipped to the clip."""
    n = float(max(n_samples, 1))
    s = np.clip(starts / n, 0, 1)
    e = np.clip(ends / n, 0, 1)
    return np.stack([s, np.zeros_like(s), e, np.ones_like(s)], -1).astype(np.float32)


def with_global(frames: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prepend the mean frame with the box of the whole clip."""
    return (np.concatenate([frames.mean(0, keepdims=True), frames]),
            np.concatenate([np.array([[0, 0, 1, 1]], np.float32), boxes]))


class LogMel:
    """``log(mel power + 1e-6)`` frames, ``stack`` at a time; see the module docstring."""

    def __init__(self, sample_rate: int = 16000, n_mels: int = 80, win_ms: float = 25.0,
                 hop_ms: float = 10.0, stack: int = 1):
        import torchaudio.transforms as T

        self.win = int(round(sample_rate * win_ms / 1000))
        self.hop = int(round(sample_rate * hop_ms / 1000))
        self.stack = stack
        self.dim = n_mels * stack
        self.mel = T.MelSpectrogram(sample_rate=sample_rate, n_fft=self.win, win_length=self.win,
                                    hop_length=self.hop, n_mels=n_mels, center=False, power=2.0)

    def __repr__(self) -> str:
        return f"LogMel(win={self.win}, hop={self.hop}, stack={self.stack}, dim={self.dim})"

    # Samples per batched transform (16 MB of float32 input): bounds the (B, freq, frames) power
    # spectrogram whatever the clip lengths.
    MAX_BATCH_SAMPLES = 1 << 22

    def __call__(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.many([samples])[0]

    @torch.inference_mode()
    def many(self, clips: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """``[(frames, boxes)]`` for each clip, computed in a few batched transforms.

        One call per clip costs more in dispatch than in arithmetic at these sizes (a 3 s clip is
        300 frames). Clips of similar length are zero-padded on the right into one (B, L) batch:
        with no centre padding, frame k of a clip reads only its samples ``[k hop, k hop + win)``,
        so the frames inside the clip are those of the clip alone and the padded tail's frames are
        dropped."""
        out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(clips)
        order = sorted(range(len(clips)), key=lambda i: clips[i].size)
        group: list[int] = []
        for i in order:  # ascending lengths: the last clip in a group is its longest
            if group and (len(group) + 1) * max(clips[i].size, self.win) > self.MAX_BATCH_SAMPLES:
                self._batch(clips, group, out)
                group = []
            group.append(i)
        if group:
            self._batch(clips, group, out)
        return out  # type: ignore[return-value]

    def _batch(self, clips: list[np.ndarray], group: list[int], out: list) -> None:
        length = max(clips[group[-1]].size, self.win)  # a clip shorter than a window: zero-padded
        x = torch.zeros(len(group), length)
        for row, i in enumerate(group):
            x[row, :clips[i].size] = torch.from_numpy(np.asarray(clips[i], dtype=np.float32))
        mel = torch.log(self.mel(x) + 1e-6).transpose(1, 2).contiguous()  # (B, T, n_mels)
        for row, i in enumerate(group):
            n = clips[i].size
            frames = 1 + (max(n, self.win) - self.win) // self.hop
            out[i] = self._stacked(mel[row, :frames], n)

    def _stacked(self, mel: torch.Tensor, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(T, n_mels) frames of an ``n``-sample clip -> stacked frames and their boxes."""
        t = mel.shape[0] // self.stack * self.stack or mel.shape[0]  # drop a partial last stack
        if self.stack > 1 and mel.shape[0] >= self.stack:
            mel = mel[:t].reshape(t // self.stack, -1)                # (T / stack, n_mels * stack)
        elif self.stack > 1:  # fewer frames than one stack: pad by repeating the last frame
            mel = torch.cat([mel, mel[-1:].expand(self.stack - mel.shape[0], -1)]).reshape(1, -1)
        k = np.arange(mel.shape[0])
        step = self.hop * self.stack
        starts = k * step
        ends = starts + (self.stack - 1) * self.hop + self.win
        return mel.numpy(), spans_to_boxes(starts, ends, n)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``torch.save``-d state dict (weights only, no pickle)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


class SSLEncoder:
    """Hidden states of layer ``layer`` of a torchaudio wav2vec 2.0-family model (20 ms frames)."""

    WIN, HOP = 400, 320  # the convolutional front end's receptive field and stride at 16 kHz

    def __init__(self, architecture: str = "wav2vec2_base", weights: str | None = None,
                 layer: int = -1, normalize: bool = False, device: str = "cpu",
                 config: dict | None = None):
        import torchaudio.models as M

        if architecture not in SSL_ARCHITECTURES:
            raise ValueError(f"unknown encoder architecture {architecture!r}; known: "
                             f"{', '.join(SSL_ARCHITECTURES)}")
        self.model = getattr(M, architecture)(**(config or {}))
        self.warnings: list[str] = []
        if weights:
            missing, unexpected = self.model.load_state_dict(load_state_dict(weights), strict=False)
            if missing or unexpected:
                raise ValueError(f"weights {weights} do not fit torchaudio's {architecture}: "
                                 f"missing {missing[:3]}, unexpected {unexpected[:3]} (torchaudio's "
                                 f"own key names are expected)")
            self.weights = str(weights)
        else:
            self.weights = "random"
            msg = (f"speech encoder {architecture} has RANDOM weights: its features carry no "
                   f"information about speech (fine for tests only); set weights: to a local file")
            warnings.warn(msg, stacklevel=2)
            log.warning(msg)
            self.warnings.append(msg)  # for the manifest
        self.model.eval().to(device)
        self.layer, self.normalize, self.device = layer, normalize, device
        self.dim = int(self.model.encoder.transformer.layers[0].attention.k_proj.out_features)

    def __repr__(self) -> str:
        return f"SSLEncoder(layer={self.layer}, dim={self.dim}, weights={self.weights})"

    def many(self, clips: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """One clip at a time: padding a batch would change the group-normalised convolutions."""
        return [self(x) for x in clips]

    @torch.inference_mode()
    def __call__(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = samples.size
        x = torch.from_numpy(samples)[None].to(self.device)
        if n < self.WIN:
            x = torch.nn.functional.pad(x, (0, self.WIN - n))
        if self.normalize:  # the large LV-60k checkpoints expect zero mean, unit variance input
            x = (x - x.mean()) / (x.std() + 1e-7)
        layers, _ = self.model.extract_features(x)
        h = layers[self.layer][0].float().cpu().numpy()             # (T, D)
        starts = np.arange(h.shape[0]) * self.HOP
        return h, spans_to_boxes(starts, starts + self.WIN, n)
