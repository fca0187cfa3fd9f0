"""The ``cogportrait`` command line. Each subcommand imports its pipeline lazily (Ray is heavy)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cogportrait.config import CurateConfig, from_mapping, load_params

log = logging.getLogger("cogportrait")


def setup_logging(verbose: bool = False) -> None:
    """One logging style for every command; logs go to stderr so stdout stays machine-readable."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _section(args: argparse.Namespace, name: str) -> dict:
    params_path = Path(args.params)
    if params_path.exists():
        return dict(load_params(params_path).get(name) or {})
    if args.params != "params.yaml":
        raise SystemExit(f"params file {params_path} not found")
    return {}


def _config(args: argparse.Namespace, cls: type, section: str, flags: dict[str, str]):
    """A stage's config: its params.yaml section, overridden by the command-line flags given.

    ``flags`` maps config keys to argparse attribute names.
    """
    values = _section(args, section)
    for key, attr in flags.items():
        if getattr(args, attr, None):
            values[key] = getattr(args, attr)
    return from_mapping(cls, values, section)


def _print_json(obj: dict) -> int:
    print(json.dumps(obj, indent=2, sort_keys=True))
    return 0


def cmd_curate(args: argparse.Namespace) -> int:
    from pipelines.curate import run

    flags = {"manifest": "manifest", "out": "out", "num_workers": "workers"}
    return _print_json(run(_config(args, CurateConfig, "curate", flags)))


def cmd_extract(args: argparse.Namespace) -> int:
    from cogportrait.config import ExtractConfig
    from pipelines.extract import run

    flags = {"clips": "clips", "out": "out", "num_workers": "workers", "au_backend": "au_backend"}
    return _print_json(run(_config(args, ExtractConfig, "extract", flags)))


def cmd_invert(args: argparse.Namespace) -> int:
    from cogportrait.config import EventsConfig, InvertConfig
    from pipelines.invert import run

    cfg = _config(args, InvertConfig, "invert", {"frames": "frames", "out": "out", "num_workers": "workers"})
    return _print_json(run(cfg, _config(args, EventsConfig, "events", {})))


def cmd_face_convert_flame(args: argparse.Namespace) -> int:
    from cogportrait.face.flame import convert_flame

    info = convert_flame(args.model, args.embedding, args.out, n_shape=args.n_shape)
    print(json.dumps(info, indent=2, sort_keys=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cogportrait", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: ./params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("curate", help="raw videos -> clean 512² 25 fps face clips (Ray Data job)")
    p.add_argument("--manifest", help="manifest.csv (its folder is the dataset root)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--workers", type=int, help="Ray workers (CPUs) to use")
    p.set_defaults(func=cmd_curate)

    p = sub.add_parser("extract", help="clips -> per-frame landmarks, blendshapes, pose, keypoints (Ray Data job)")
    p.add_argument("--clips", help="clips.parquet written by curate")
    p.add_argument("--out", help="output folder (frames-*.parquet, clips.parquet, rejects.parquet, metrics.json)")
    p.add_argument("--au-backend", dest="au_backend", help="blendshape (default) or pyfeat")
    p.add_argument("--workers", type=int, help="Ray workers (CPUs) to use")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("invert", help="frames -> 17-channel controls, face model, events (Ray Data job)")
    p.add_argument("--frames", help="folder written by extract")
    p.add_argument("--out", help="output folder (controls.parquet, events.parquet, face_model/, metrics.json)")
    p.add_argument("--workers", type=int, help="Ray workers (CPUs) to use")
    p.set_defaults(func=cmd_invert)

    p = sub.add_parser("face", help="face-model utilities")
    face_sub = p.add_subparsers(dest="face_command", required=True)
    q = face_sub.add_parser(
        "convert-flame",
        help="convert a licensed FLAME model.pkl + MediaPipe landmark embedding.npz into a pickle-free OUT.npz "
        "(the only command that reads a pickle: run it once, on your own file)",
    )
    q.add_argument("model", help="FLAME generic_model.pkl (from flame.is.tue.mpg.de, under its licence)")
    q.add_argument("embedding", help="mediapipe_landmark_embedding.npz (lmk_face_idx, lmk_b_coords, landmark_indices)")
    q.add_argument("out", help="output .npz read by the flame face-model backend")
    q.add_argument("--n-shape", dest="n_shape", type=int, default=300, help="shape components before the expression ones (FLAME 2020: 300)")
    q.set_defaults(func=cmd_face_convert_flame)

    from prototype_store.cli import add_library_commands  # library build|query|stats|show, kto mine

    add_library_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
