"""The ``weightlens`` command line.

Examples
--------
  weightlens zoo build --size ci          # train the CI-size zoo (about 2 minutes on 2 cores)
  weightlens zoo list                     # what is built, with base and fine-tuned accuracies
  weightlens tour --headless --out reports/tour.html
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from weightlens.errors import WeightlensError

_EPILOG = __doc__.split("Examples\n--------\n", 1)[1]


def _zoo_build(args: argparse.Namespace) -> int:
    from weightlens import zoo

    folders = zoo.build(size=args.size, names=args.names or None, force=args.force, progress=not args.quiet)
    for name, folder in folders.items():
        sys.stdout.write(f"{name}: {folder}\n")
    return 0


def _zoo_list(args: argparse.Namespace) -> int:
    from weightlens import zoo
    from weightlens.zoo._common import read_manifest, zoo_dir

    for size in zoo.SIZES:
        for name in zoo.NAMES:
            folder = zoo_dir(name, size)
            state = "built" if (folder / "manifest.json").is_file() else "not built"
            line = f"{size:5s} {name:14s} {state:10s} {folder}"
            if state == "built":
                summary = read_manifest(folder).get("summary")
                line += f"  {summary}" if summary else ""
            sys.stdout.write(line + "\n")
    return 0


def _tour(args: argparse.Namespace) -> int:
    from weightlens._tour import run_tour

    out = run_tour(Path(args.notebook), Path(args.out), headless=args.headless)
    sys.stdout.write(f"{out}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="weightlens",
        description="Weight-space geometry of neural networks: analyse, merge, export.",
        epilog="examples:\n" + _EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    zoo_p = sub.add_parser("zoo", help="build or list the offline model zoo")
    zoo_sub = zoo_p.add_subparsers(dest="zoo_command", required=True)
    build = zoo_sub.add_parser("build", help="train and cache the zoo (skips what is built)")
    build.add_argument("--size", choices=("ci", "demo"), default="ci")
    build.add_argument("--names", nargs="*", help="zoos to build (default: all)")
    build.add_argument("--force", action="store_true", help="rebuild even when built")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.set_defaults(func=_zoo_build)
    zoo_sub.add_parser("list", help="show built zoos").set_defaults(func=_zoo_list)

    tour = sub.add_parser("tour", help="execute the tour notebook into a standalone HTML report")
    tour.add_argument("--headless", action="store_true", help="execute and write HTML (no browser)")
    tour.add_argument("--notebook", default="notebooks/00_tour.ipynb")
    tour.add_argument("--out", default="reports/tour.html")
    tour.set_defaults(func=_tour)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (1 for a weightlens error, with its one-line message)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (WeightlensError, FileNotFoundError) as err:
        sys.stderr.write(f"weightlens: error: {err}\n")
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
