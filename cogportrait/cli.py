"""The ``cogportrait`` command line. Each subcommand imports its pipeline lazily (Ray is heavy)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
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


def cmd_curate(args: argparse.Namespace) -> int:
    from pipelines.curate import run

    values = _section(args, "curate")
    if args.manifest:
        values["manifest"] = args.manifest
    if args.out:
        values["out"] = args.out
    if args.workers:
        values["num_workers"] = args.workers
    cfg = from_mapping(CurateConfig, values, "curate")
    counts = run(cfg)
    print(json.dumps(counts, indent=2, sort_keys=True))
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

    from prototype_store.cli import add_library_commands  # library build|query|stats|show, kto mine

    add_library_commands(sub)
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"curate": cmd_curate}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
