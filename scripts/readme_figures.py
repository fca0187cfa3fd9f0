"""Make the README's pictures from the DAG's outputs (run after ``dvc repro``):

    .venv/bin/python scripts/readme_figures.py        # -> docs/figures/

* ``contact_sheet.png``: the first frame of every curated clip, with its video id;
* ``channels.png``: one prototype's 17 channels (``prototype_store.plot``);
* ``keypoints.gif``: the same prototype's 62 eye-region keypoints, animated (``prototype_store.preview``);
* ``compiled.gif``: Stage 1's preview of a compiled request (the EMH drowsiness case, ``generate_emh``),
  every 10th frame at 160 px;
* ``eval_chart.png``: ``evaluate videos``' chart of the EMH cases scored against themselves and, for
  one case, against another person's clip (the harness's own check; the DAG's chart scores the
  generated videos).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cogportrait.config import CompileConfig, ExtractConfig, InvertConfig, VideoEvalConfig  # noqa: E402
from cogportrait.face.extract import iter_clip_frames  # noqa: E402
from pipelines.evaluate_videos import run as evaluate  # noqa: E402
from prototype_store import PrototypeStore  # noqa: E402
from prototype_store.plot import plot_prototype  # noqa: E402
from prototype_store.preview import write_keypoint_gif  # noqa: E402

OUT = REPO / "docs" / "figures"
TILE = 160


def contact_sheet(clips: pl.DataFrame, root: Path, out: Path, columns: int = 5) -> None:
    tiles = []
    for row in clips.sort("video_id", "start_frame").iter_rows(named=True):
        _, rgb = next(iter_clip_frames(root / row["clip_path"]))
        tile = cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), (TILE, TILE), interpolation=cv2.INTER_AREA)
        cv2.putText(tile, row["video_id"][:18], (4, TILE - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(tile)
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.hstack(tiles[i:i + columns]) for i in range(0, len(tiles), columns)]
    cv2.imwrite(str(out), np.vstack(rows))


def compiled_gif(preview: Path, out: Path, every: int = 10, side: int = 160) -> None:
    from PIL import Image

    frames = [Image.fromarray(cv2.resize(rgb, (side, side), interpolation=cv2.INTER_AREA))
              for idx, rgb in iter_clip_frames(preview) if idx % every == 0]
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=every * 40, loop=0)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    clips = pl.read_parquet(REPO / "data" / "curate" / "clips.parquet")
    contact_sheet(clips, REPO / "data" / "curate", OUT / "contact_sheet.png")

    store = PrototypeStore.open(REPO / "data" / "library")
    [match] = store.query({"AU45L": 1.0, "AU45R": 1.0}, event_type="blink", k=1)
    plot_prototype(match, OUT / "channels.png")
    write_keypoint_gif(np.asarray(match.keypoints), OUT / "keypoints.gif")

    compiled_gif(REPO / "data/eval/generated/requests/lp_d3/stage1/preview.mp4", OUT / "compiled.gif")

    with tempfile.TemporaryDirectory() as tmp:
        gen, ref = Path(tmp) / "generated", Path(tmp) / "reference"
        gen.mkdir()
        ref.mkdir()
        path_of = {r["video_id"]: REPO / "data" / "curate" / r["clip_path"] for r in clips.iter_rows(named=True)}
        for case in ("lp_d0", "lp_d3", "lp_d10", "tpsmm_driving"):
            shutil.copy(path_of[case], ref / f"{case}.mp4")
            shutil.copy(path_of["edtalk_mouth" if case == "lp_d10" else case], gen / f"{case}.mp4")
        evaluate(VideoEvalConfig(generated=str(gen), reference=str(ref), out=str(Path(tmp) / "out")), CompileConfig(),
                 ExtractConfig(), InvertConfig())
        shutil.copy(Path(tmp) / "out" / "chart.png", OUT / "eval_chart.png")
    print(f"wrote {', '.join(sorted(p.name for p in OUT.iterdir()))} in {OUT}")


if __name__ == "__main__":
    main()
