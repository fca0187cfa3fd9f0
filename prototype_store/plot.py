"""A readable picture of one prototype: the 17 channels over time in four panels.

The panels are drawn by ``cogportrait.behavior.plot`` (also behind the compiler's channels.png).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cogportrait.behavior.plot import PANELS, channel_figure, draw_channel_panels, save_png
from cogportrait.schema import CLIP_FPS

__all__ = ["PANELS", "plot_prototype"]


def plot_prototype(match, out: str | Path) -> Path:
    """Write a PNG of ``match.controls`` (T x 17); left/right pairs share a colour, right dashed."""
    controls = np.asarray(match.controls)
    T = len(controls)
    t = (match.start_frame + np.arange(T)) / CLIP_FPS
    fig, axes = channel_figure()
    draw_channel_panels(axes, t, controls)
    axes[-1].set_xlabel(f"time in clip (s) — frames {match.start_frame}–{match.end_frame - 1} at {CLIP_FPS} fps")
    flags = f" · flags: {', '.join(match.quality_flags)}" if match.quality_flags else ""
    fig.suptitle(
        f"prototype {match.prototype_id[:8]} · {match.event_type} · label: {match.label}\n"
        f"clip {str(match.clip_id)[:8]} · identity {match.identity} · T={T}{flags}",
        fontsize=11,
    )
    return save_png(fig, out)
