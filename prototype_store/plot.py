"""A readable picture of one prototype: the 17 channels over time in four panels."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cogportrait.io.atomic import atomic_path
from cogportrait.schema import CHANNEL_INDEX, CLIP_FPS

PANELS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("brows", ("AU1", "AU2L", "AU2R", "AU4L", "AU4R"), "activation (0-1)"),
    ("lids", ("AU5", "AU7", "AU41", "AU45L", "AU45R"), "activation (0-1)"),
    ("gaze", ("gaze_left", "gaze_right", "gaze_up", "gaze_down"), "direction (0-1)"),
    ("head", ("yaw", "pitch", "roll"), "degrees"),
)


def plot_prototype(match, out: str | Path) -> Path:
    """Write a PNG of ``match.controls`` (T x 17); left/right pairs share a colour, right dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    controls = np.asarray(match.controls)
    T = len(controls)
    t = (match.start_frame + np.arange(T)) / CLIP_FPS
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(10, 9), sharex=True, constrained_layout=True)
    colours = plt.get_cmap("tab10").colors
    for ax, (title, names, unit) in zip(axes, PANELS):
        colour_of: dict[str, tuple] = {}
        for i, name in enumerate(names):
            stem = name[:-1] if name.endswith(("L", "R")) and name.startswith("AU") else name
            colour = colour_of.setdefault(stem, colours[len(colour_of) % len(colours)])
            style = "--" if name.endswith("R") and name.startswith("AU") else "-"
            ax.plot(t, controls[:, CHANNEL_INDEX[name]], style, color=colour, lw=1.8, label=name)
        if unit.endswith("(0-1)"):
            ax.set_ylim(-0.03, 1.03)
        else:
            ax.axhline(0, color="0.7", lw=0.8)
        ax.set_ylabel(f"{title}\n{unit}")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    axes[-1].set_xlabel(f"time in clip (s) — frames {match.start_frame}–{match.end_frame - 1} at {CLIP_FPS} fps")
    flags = f" · flags: {', '.join(match.quality_flags)}" if match.quality_flags else ""
    fig.suptitle(
        f"prototype {match.prototype_id[:8]} · {match.event_type} · label: {match.label}\n"
        f"clip {str(match.clip_id)[:8]} · identity {match.identity} · T={T}{flags}",
        fontsize=11,
    )
    out = Path(out)
    with atomic_path(out, ".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out
