"""pipeline.plots: the smoothed loss curve and the legend placed outside the data."""

from __future__ import annotations

import numpy as np


def _axes():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(5, 3.4))


def test_smoothed_curve_is_a_centred_moving_average_over_the_raw_values() -> None:
    from pipeline.plots import smoothed_curve

    fig, ax = _axes()
    steps = np.arange(1, 101)
    values = np.random.default_rng(0).normal(size=100)
    w = smoothed_curve(ax, steps, values, color="C0", label="loss")
    assert w == 5  # about 5% of 100 points, odd so that it is centred
    raw, smooth = ax.lines
    assert raw.get_alpha() == 0.25 and np.array_equal(raw.get_ydata(), values)
    y = smooth.get_ydata()
    assert np.isclose(y[50], values[48:53].mean())  # centred on its step
    assert np.isclose(y[0], values[:3].mean())  # the ends average what there is, unbiased
    assert np.isclose(y[-1], values[-3:].mean())
    assert smooth.get_label() == "loss"
    fig2, ax2 = _axes()
    assert smoothed_curve(ax2, steps[:30], values[:30], color="C0") == 1  # short: drawn raw
    assert len(ax2.lines) == 1 and np.array_equal(ax2.lines[0].get_ydata(), values[:30])


def test_legend_below_sits_outside_the_axes() -> None:
    from pipeline.plots import legend_below

    fig, ax = _axes()
    ax.plot([1, 2, 3], [3, 1, 2], label="a")
    ax.plot([1, 2, 3], [1, 2, 3], label="b")
    legend_below(ax, ncols=2)
    fig.tight_layout()
    fig.canvas.draw()
    box = ax.get_legend().get_window_extent()
    assert box.y1 <= ax.get_window_extent().y0  # wholly under the data area
