"""Make the parity reference files: the peers' own code on small structured inputs.

    python tests/peer_references/make.py                  # a throw-away environment, every cases_*.py
    python tests/peer_references/make.py --venv PATH      # reuse (or create and keep) the environment at PATH
    python tests/peer_references/make.py --only mergekit  # only cases_mergekit.py

The environment gets the anchors pinned as the repository pins them: torch from ``constraints.txt`` first
(the CPU build), then ``peers.txt`` (mergekit) and ``peers-bench.txt`` (FusionBench) with ``-c constraints.txt``.
Each ``cases_<name>.py`` runs there as ``VENV/bin/python cases_<name>.py OUTDIR`` and writes
``OUTDIR/<peer>_<method>_<case>.safetensors`` (tensors ``input.*`` and ``expected.*``; JSON metadata with at least
``peer``, ``method`` and ``params``). A module's files replace those of the same (peer, method) pairs in
``data/``; the generators are seeded, so a re-run on the same pins rewrites the same bytes.
``tests/test_peer_references.py`` compares weightlens against them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DATA = HERE / "data"
REQUIREMENTS = ("peers.txt", "peers-bench.txt")  # mergekit; FusionBench
TORCH = "torch==2.13.0"  # installed first, as ./dev.sh does, so that the peers resolve against the CPU build
LIMIT = 2 * 2**20  # bytes of committed references


def run(cmd: list[str]) -> None:
    """Run ``cmd`` from the repository root, echoed; fail on a non-zero exit."""
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def ensure_venv(venv: Path, install: bool) -> Path:
    """The environment's Python, after creating it and installing the pinned anchors (unless ``install`` is
    False and it exists)."""
    python = venv / "bin" / "python"
    if not python.is_file():
        run([sys.executable, "-m", "venv", str(venv)])
        install = True
    if install:
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        run(pip + ["-c", "constraints.txt", TORCH])
        run(pip + ["-c", "constraints.txt"] + [a for r in REQUIREMENTS for a in ("-r", r)])
    return python


def metadata(path: Path) -> dict[str, object]:
    """The JSON-decoded metadata of a reference file (read from the safetensors header: no torch needed)."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {k: json.loads(v) for k, v in header.get("__metadata__", {}).items()}


def make(python: Path, modules: list[Path]) -> list[Path]:
    """Run each generator into a fresh folder, then move its files into ``data/``, replacing the files of the
    same (peer, method) pairs (cases it no longer writes go with them)."""
    DATA.mkdir(exist_ok=True)
    written = []
    for module in modules:
        with tempfile.TemporaryDirectory(prefix=f"{module.stem}-") as out:
            run([str(python), str(module), out])
            files = sorted(Path(out).glob("*.safetensors"))
            if not files:
                raise SystemExit(f"{module.name} wrote no reference file")
            pairs = set()
            for f in files:
                meta = metadata(f)
                missing = {"peer", "method", "params"} - set(meta)
                if missing:
                    raise SystemExit(f"{module.name}: {f.name} lacks the metadata {sorted(missing)}")
                pairs.add((meta["peer"], meta["method"]))
            for old in DATA.glob("*.safetensors"):
                meta = metadata(old)
                if (meta.get("peer"), meta.get("method")) in pairs:
                    old.unlink()
            for f in files:
                shutil.copyfile(f, DATA / f.name)
                written.append(DATA / f.name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, help="environment to reuse (created there and kept if missing)")
    parser.add_argument("--install", action="store_true", help="with --venv: (re)install the pinned anchors")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run cases_NAME.py only (repeatable)")
    args = parser.parse_args(argv)
    modules = sorted(HERE.glob("cases_*.py"))
    if args.only:
        modules = [m for m in modules if m.stem.removeprefix("cases_") in args.only]
        if len(modules) != len(set(args.only)):
            parser.error(f"--only: no such generator among {[m.stem for m in sorted(HERE.glob('cases_*.py'))]}")
    with tempfile.TemporaryDirectory(prefix="weightlens-peers-") as scratch:
        venv = args.venv or Path(scratch) / "venv"
        python = ensure_venv(venv, install=args.install or args.venv is None)
        written = make(python, modules)
    total = sum(p.stat().st_size for p in DATA.glob("*.safetensors"))
    print(f"{len(written)} reference files written; data/ holds {total / 2**20:.2f} MiB")
    if total > LIMIT:
        print(f"data/ is over {LIMIT / 2**20:.0f} MiB: make the cases smaller", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
