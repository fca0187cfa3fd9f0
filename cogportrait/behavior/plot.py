"""Readable pictures of control trajectories: the 17 channels over time in four panels.

One panel drawing serves both the prototype library (``prototype_store.plot``: one prototype) and
the compiler (``channels.png``: a compiled sequence with its planned events shaded and named), so
the two pictures read the same way: brows, lids, gaze, head; a left/right pair shares a colour and
the right one is dashed.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cogportrait.io.atomic import atomic_path
from cogportrait.schema import CHANNEL_INDEX, CLIP_FPS, CONTROL_CHANNELS, N_CHANNELS

PANELS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("brows", ("AU1", "AU2L", "AU2R", "AU4L", "AU4R"), "activation (0-1)"),
    ("lids", ("AU5", "AU7", "AU41", "AU45L", "AU45R"), "activation (0-1)"),
    ("gaze", ("gaze_left", "gaze_right", "gaze_up", "gaze_down"), "direction (0-1)"),
    ("head", ("yaw", "pitch", "roll"), "degrees"),
)
assert sorted(n for _, names, _ in PANELS for n in names) == sorted(CONTROL_CHANNELS)

SPAN_FILLS = ("#dbe9f6", "#f6e7d2")  # alternating light fills for consecutive events
Span = tuple[int, int, str]  # start_frame, end_frame (exclusive), stage text


class PlotInputError(ValueError):
    """Controls or spans the plot cannot draw."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def channel_figure(n_panels: int = len(PANELS)):
    """A figure with one row per panel, sharing the time axis."""
    plt = _pyplot()
    fig, axes = plt.subplots(n_panels, 1, figsize=(10, 9), sharex=True, constrained_layout=True)
    return fig, axes


def draw_channel_panels(axes: Sequence, t: np.ndarray, controls: np.ndarray) -> None:
    """Draw ``controls`` (T x 17) against times ``t`` on the ``PANELS`` axes, one panel per axis."""
    plt = _pyplot()
    controls = np.asarray(controls)
    if controls.ndim != 2 or controls.shape[1] != N_CHANNELS or len(controls) != len(t):
        raise PlotInputError(f"controls must be (T={len(t)}, {N_CHANNELS}), got {controls.shape}")
    colours = plt.get_cmap("tab10").colors
    for ax, (title, names, unit) in zip(axes, PANELS):
        colour_of: dict[str, tuple] = {}
        for name in names:
            paired = name.startswith("AU") and name.endswith(("L", "R"))
            stem = name[:-1] if paired else name
            colour = colour_of.setdefault(stem, colours[len(colour_of) % len(colours)])
            style = "--" if paired and name.endswith("R") else "-"
            ax.plot(t, controls[:, CHANNEL_INDEX[name]], style, color=colour, lw=1.8, label=name)
        if unit.endswith("(0-1)"):
            ax.set_ylim(-0.03, 1.03)
        else:
            ax.axhline(0, color="0.7", lw=0.8)
        ax.set_ylabel(f"{title}\n{unit}")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)


def save_png(fig, out: str | os.PathLike, dpi: int = 110) -> Path:
    """Write the figure as a PNG atomically and free it."""
    out = Path(out)
    try:
        with atomic_path(out, ".png") as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        _pyplot().close(fig)
    return out


def _span_label(k: int, text: str, share: float) -> str:
    """Event number and stage text wrapped to the span's width (about 95 characters across the axis)."""
    width = int(share * 95)
    if width < 6:
        return str(k)
    lines = textwrap.wrap(f"{k} · {text}", width=width)
    if len(lines) > 3:
        lines = lines[:3]
        lines[-1] = lines[-1][: max(1, width - 1)] + "…"
    return "\n".join(lines)


def plot_channels(
    controls: np.ndarray, spans: Sequence[Span], out: str | os.PathLike, title: str, fps: int = CLIP_FPS
) -> Path:
    """Write ``channels.png``: the 17 channels over time with each event shaded and named.

    ``spans`` are (start_frame, end_frame exclusive, stage text), drawn in alternating light fills
    in every panel and numbered and labelled above the top one. Returns ``out``.
    """
    controls = np.asarray(controls, dtype=np.float64)
    T = len(controls)
    if T == 0:
        raise PlotInputError("no frames to plot")
    t = np.arange(T) / fps
    fig, axes = channel_figure()
    total = T / fps
    for k, (start, end, text) in enumerate(spans):  # 0-based, as event_index everywhere else
        if not 0 <= start < end <= T:
            raise PlotInputError(f"span {k} [{start}, {end}) is outside the sequence [0, {T})")
        x0, x1 = start / fps, end / fps
        for ax in axes:
            ax.axvspan(x0, x1, color=SPAN_FILLS[(k - 1) % len(SPAN_FILLS)], alpha=0.8, lw=0, zorder=0)
        axes[0].text(
            (x0 + x1) / 2, 1.02, _span_label(k, text, (x1 - x0) / total), transform=axes[0].get_xaxis_transform(),
            ha="center", va="bottom", fontsize=7.5, clip_on=False,
        )
    draw_channel_panels(axes, t, controls)
    axes[-1].set_xlim(0, total)
    axes[-1].set_xlabel(f"time (s) — {T} frames at {fps} fps")
    fig.suptitle(title, fontsize=11)
    return save_png(fig, out)
