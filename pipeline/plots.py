"""Plot helpers stages share for the PNGs in their artifacts (the run report shows them as they are)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def smoothed_curve(ax: Any, steps: Sequence[float], values: Sequence[float], *, color: str,
                   label: str | None = None) -> int:
    """Draw ``values`` against ``steps`` on ``ax`` as a centred moving average over about 5% of the
    points (per-step losses are too noisy to read), with the raw values faint behind it; short
    series (under 40 points) are drawn raw. Returns the window (1: raw)."""
    import numpy as np

    x = np.asarray(steps, dtype=float)
    y = np.asarray(values, dtype=float)
    w = max(1, len(y) // 20) | 1  # odd, so that the window is centred on its step
    if w > 1:
        k = np.ones(w)
        ax.plot(x, y, color=color, alpha=0.25, linewidth=0.8)
        # dividing by the window's count at each point keeps the ends unbiased
        y = np.convolve(y, k, "same") / np.convolve(np.ones(len(y)), k, "same")
    ax.plot(x, y, color=color, linewidth=1.6, label=label)
    return w


def legend_below(ax: Any, ncols: int = 3) -> None:
    """The axes' legend under them, outside the data, where it hides no curve or bar (with
    ``fig.tight_layout()`` making room for it)."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=ncols, frameon=False)
