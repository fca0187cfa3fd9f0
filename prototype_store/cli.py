"""``cogportrait library ...`` and ``cogportrait kto mine``: argument wiring for cogportrait/cli.py.

Kept here so the main CLI file only registers these commands. Heavy imports (faiss, Ray) happen
inside the command functions; errors a user can fix exit with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from cogportrait.config import IndexConfig, KtoConfig, PrototypesConfig, from_mapping, load_params

log = logging.getLogger("cogportrait.library")


def _params(args: argparse.Namespace, section: str) -> dict[str, Any]:
    path = Path(args.params)
    if path.exists():
        return dict(load_params(path).get(section) or {})
    if args.params != "params.yaml":
        raise SystemExit(f"params file {path} not found")
    return {}


def _user_errors() -> tuple[type[BaseException], ...]:
    from prototype_store import LibraryError, TargetError, UnknownChannelError
    from cogportrait.config import ConfigError

    return (LibraryError, TargetError, UnknownChannelError, ConfigError, FileNotFoundError)


def _fail(exc: BaseException) -> int:
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    print(f"error: {msg}", file=sys.stderr)
    return 2


def cmd_library_build(args: argparse.Namespace) -> int:
    from prototype_store import build_index

    pvals = _params(args, "prototypes")
    ivals = _params(args, "index")
    if args.controls:
        pvals["controls"] = args.controls
    if args.clips:
        pvals["clips"] = args.clips
    if args.frames:
        pvals["frames"] = args.frames
    if args.out:
        pvals["out"] = args.out
        ivals["library"] = args.out
    if args.workers:
        pvals["num_workers"] = args.workers
    try:
        pcfg = from_mapping(PrototypesConfig, pvals, "prototypes")
        icfg = from_mapping(IndexConfig, ivals, "index")
        result: dict[str, Any] = {}
        if args.only in (None, "prototypes"):
            if args.local:
                from prototype_store.build import build_prototypes_local

                result["prototypes"] = build_prototypes_local(pcfg)
            else:
                from pipelines.prototypes import run

                result["prototypes"] = run(pcfg)
        if args.only in (None, "index"):
            meta = build_index(icfg.library, icfg)
            result["index"] = {k: meta[k] for k in ("kind", "n", "nlist", "nprobe", "recall_at_5", "build_s", "fingerprint")}
    except _user_errors() as exc:
        return _fail(exc)
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def _library_path(args: argparse.Namespace) -> str:
    if getattr(args, "library", None):
        return args.library
    return str(_params(args, "index").get("library", IndexConfig.library))


def cmd_library_query(args: argparse.Namespace) -> int:
    from prototype_store import PrototypeStore
    from prototype_store.retrieval import parse_target_arg

    try:
        targets = dict(parse_target_arg(t) for t in args.target)
        # one query per process: sorting the features for the walk (seconds at 1e6 rows) would
        # cost more than the scan it saves, so the CLI leaves the walk out (same answers)
        store = PrototypeStore.open(_library_path(args), walk_min_rows=sys.maxsize)
        matches = store.query(
            targets,
            label=args.label,
            event_type=args.event_type,
            k=args.k,
            min_frames=args.min_frames,
            identity_exclude=args.exclude_identity or None,
            arrays=args.arrays,
        )
    except _user_errors() + (KeyError,) as exc:
        return _fail(exc)
    if args.json:
        json.dump([m.to_dict(arrays=args.arrays) for m in matches], sys.stdout)
        sys.stdout.write("\n")
        return 0
    if not matches:
        print("no prototype passes the filters")
        return 0
    shown = list(targets)
    print(f"{'#':>2} {'distance':>9}  {'event_type':<17} {'T':>4}  {'label':<20} {'prototype_id':<36}  " + " ".join(f"{n:>9}" for n in shown))
    from prototype_store.retrieval import CHANNEL_ALIASES
    from cogportrait.schema import CHANNEL_INDEX

    for m in matches:
        vals = []
        for n in shown:
            j = CHANNEL_INDEX[CHANNEL_ALIASES[n][0]] if n in CHANNEL_ALIASES else CHANNEL_INDEX[n]
            vals.append(f"{m.channel_mean[j]:.2f}/{m.channel_max[j]:.2f}")
        print(f"{m.rank:>2} {m.distance:9.4f}  {str(m.event_type):<17} {m.T:>4}  {str(m.label)[:20]:<20} {m.prototype_id:<36}  " + " ".join(f"{v:>9}" for v in vals))
    print("(channel columns: mean/peak)")
    return 0


def cmd_library_stats(args: argparse.Namespace) -> int:
    from prototype_store import PrototypeStore

    try:
        stats = PrototypeStore.open(args.library_pos or _library_path(args), walk_min_rows=sys.maxsize).stats()
    except _user_errors() as exc:
        return _fail(exc)
    print(json.dumps(stats, indent=2, sort_keys=True, default=str))
    return 0


def cmd_library_show(args: argparse.Namespace) -> int:
    from prototype_store import PrototypeStore

    try:
        store = PrototypeStore.open(args.library_pos, walk_min_rows=sys.maxsize)  # no search: nothing to sort
        match = store.get(args.prototype_id)
    except _user_errors() + (KeyError,) as exc:
        return _fail(exc)
    info = match.to_dict(arrays=args.arrays)
    info.pop("rank")
    info.pop("distance")
    if args.plot:
        from prototype_store.plot import plot_prototype

        info["plot"] = str(plot_prototype(match, args.plot))
        log.info("wrote %s", info["plot"])
    print(json.dumps(info, indent=2))
    return 0


def cmd_kto_mine(args: argparse.Namespace) -> int:
    values = _params(args, "kto_mine")
    for key in ("controls", "clips", "frames", "out"):
        if getattr(args, key):
            values[key] = getattr(args, key)
    if args.workers:
        values["num_workers"] = args.workers
    try:
        cfg = from_mapping(KtoConfig, values, "kto_mine")
        from pipelines.kto import run

        counts = run(cfg)
    except _user_errors() as exc:
        return _fail(exc)
    print(json.dumps(counts, indent=2, sort_keys=True))
    return 0


def add_library_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``library {build,query,stats,show}`` and ``kto mine``."""
    lib = sub.add_parser("library", help="the prototype library: build, query, stats, show")
    lsub = lib.add_subparsers(dest="library_command", required=True)

    p = lsub.add_parser("build", help="controls -> prototypes.parquet (Ray Data job) -> FAISS index")
    p.add_argument("--controls", help="invert's output folder (controls/events/frames.parquet)")
    p.add_argument("--clips", help="curate's clips.parquet (labels, identities)")
    p.add_argument("--frames", help="extract's frames.parquet (keypoints)")
    p.add_argument("--out", help="library folder (prototypes.parquet + index/)")
    p.add_argument("--only", choices=("prototypes", "index"), help="run one of the two steps")
    p.add_argument("--local", action="store_true", help="segment in-process without Ray (small data)")
    p.add_argument("--workers", type=int, help="Ray workers (CPUs) to use")
    p.set_defaults(func=cmd_library_build)

    p = lsub.add_parser("query", help="top-k prototypes by Eq. 3 for channel targets")
    p.add_argument("--library", help="library folder (default: params index.library)")
    p.add_argument("--target", action="append", required=True, metavar="NAME=VALUE",
                   help="channel target, a value or LO..HI (head angles in degrees), e.g. AU45L=0.6..1.0; repeat")
    p.add_argument("--label", help="only prototypes with this label")
    p.add_argument("--event-type", help="only this event type (or 'window')")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--min-frames", type=int)
    p.add_argument("--exclude-identity", action="append", help="leave out this identity; repeat")
    p.add_argument("--json", action="store_true", help="stdout: exactly one JSON list, ascending distance")
    p.add_argument("--arrays", action="store_true", help="include controls and keypoints per result")
    p.set_defaults(func=cmd_library_query)

    p = lsub.add_parser("stats", help="counts per label and event type, lengths, index kind and recall (JSON)")
    p.add_argument("library_pos", nargs="?", metavar="LIB")
    p.add_argument("--library", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_library_stats)

    p = lsub.add_parser("show", help="one prototype's metadata (JSON) and optionally a plot of its 17 channels")
    p.add_argument("library_pos", metavar="LIB")
    p.add_argument("prototype_id", metavar="ID")
    p.add_argument("--plot", help="write a PNG of the channels over time")
    p.add_argument("--arrays", action="store_true", help="include controls and keypoints")
    p.set_defaults(func=cmd_library_show)

    kto = sub.add_parser("kto", help="KTO preference data")
    ksub = kto.add_subparsers(dest="kto_command", required=True)
    p = ksub.add_parser("mine", help="mine desirable boundary-case windows (3-5 s) from real clips (Ray Data job)")
    p.add_argument("--controls", help="invert's output folder")
    p.add_argument("--clips", help="curate's clips.parquet")
    p.add_argument("--frames", help="extract's frames.parquet (keypoints)")
    p.add_argument("--out", help="output folder (kto.parquet, metrics.json)")
    p.add_argument("--workers", type=int)
    p.set_defaults(func=cmd_kto_mine)
