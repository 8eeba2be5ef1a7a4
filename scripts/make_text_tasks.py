"""Regenerate ``weightlens/zoo/data/text_tasks.json``: four 4-way text classification tasks.

Sources are two Debian packages (main), fetched with ``apt-get download`` and unpacked with
``dpkg -x`` (nothing is installed):

* ``wordnet-base`` (WordNet 3.0): noun and verb synset definitions, labelled by supersense
  (lexicographer file): ``wn_noun`` (animal/plant/food/artifact), ``wn_noun_b``
  (person/location/time/group), ``wn_verb`` (motion/communication/cognition/contact).
* ``fortunes``: quotes from the ``computers``, ``politics``, ``science`` and ``work`` files.

Per task and class the cleaned, deduplicated candidates are shuffled with a fixed seed and the
first 450 are split 300 train / 50 val / 100 test (demo size: 1200 / 200 / 400 per task). Smaller
(CI) sizes take the first examples of each class in stored order, so every size is a deterministic,
balanced subset. Also writes ``LICENSE-wordnet.txt`` and ``NOTICE-text-tasks.txt``.

Usage::

    python scripts/make_text_tasks.py            # download into a temp dir
    python scripts/make_text_tasks.py --debs DIR # use .deb files already in DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import subprocess
import tempfile
from pathlib import Path

SEED = 20261122
PER_CLASS = {"train": 300, "val": 50, "test": 100}
OUT = Path(__file__).resolve().parents[1] / "weightlens" / "zoo" / "data"
PACKAGES = ("wordnet-base", "fortunes")

WN_TASKS = {  # task -> (data file, [(class name, lexicographer file)])
    "wn_noun": ("data.noun", [("animal", "noun.animal"), ("plant", "noun.plant"),
                              ("food", "noun.food"), ("artifact", "noun.artifact")]),
    "wn_noun_b": ("data.noun", [("person", "noun.person"), ("location", "noun.location"),
                                ("time", "noun.time"), ("group", "noun.group")]),
    "wn_verb": ("data.verb", [("motion", "verb.motion"), ("communication", "verb.communication"),
                              ("cognition", "verb.cognition"), ("contact", "verb.contact")]),
}
FORTUNE_CLASSES = ("computers", "politics", "science", "work")
MIN_WORDS, MAX_CHARS = 4, 320


def fetch_debs(dest: Path) -> dict[str, Path]:
    """``apt-get download`` the packages into ``dest``; returns ``{package: .deb path}``."""
    dest.chmod(0o777)  # apt downloads as its sandbox user _apt (a private temp folder, removed after)
    subprocess.run(["apt-get", "download", *PACKAGES], cwd=dest, check=True, stdout=subprocess.DEVNULL)
    return find_debs(dest)


def find_debs(folder: Path) -> dict[str, Path]:
    """The newest ``<package>_*.deb`` of each package in ``folder``."""
    found = {}
    for pkg in PACKAGES:
        debs = sorted(folder.glob(f"{pkg}_*.deb"))
        if not debs:
            raise FileNotFoundError(f"No {pkg}_*.deb in {folder}; run `apt-get download {pkg}`.")
        found[pkg] = debs[-1]
    return found


def unpack(debs: dict[str, Path], dest: Path) -> dict[str, str]:
    """``dpkg -x`` each package into ``dest``; returns ``{package: version}``."""
    versions = {}
    for pkg, deb in debs.items():
        subprocess.run(["dpkg", "-x", str(deb), str(dest)], check=True)
        out = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True,
                             capture_output=True, text=True)
        versions[pkg] = out.stdout.strip()
    return versions


def clean(text: str) -> str:
    """Strip and collapse all whitespace runs to single spaces."""
    return re.sub(r"\s+", " ", text).strip()


def lexnames(root: Path) -> dict[str, int]:
    """``{lexicographer file name: number}`` parsed from the ``lexnames(5WN)`` man page."""
    import gzip

    page = gzip.decompress((root / "usr/share/man/man5/lexnames.5WN.gz").read_bytes())
    table = re.findall(r"^(\d\d)\s+([a-z]+\.[A-Za-z]+)\s", page.decode("latin-1"), re.M)
    return {name: int(num) for num, name in table}


def wordnet_definitions(path: Path) -> dict[int, list[str]]:
    """``{lex file number: [definition, ...]}`` from a WordNet ``data.*`` file.

    The gloss after ``|`` is cut before its first quoted example; licence header lines (which
    start with two spaces) are skipped.
    """
    out: dict[int, list[str]] = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith("  ") or " | " not in line:
            continue
        head, gloss = line.split(" | ", 1)
        definition = clean(re.split(r';?\s*"', gloss, maxsplit=1)[0]).rstrip(";").strip()
        if definition:
            out.setdefault(int(head.split()[1]), []).append(definition)
    return out


def fortune_entries(path: Path) -> list[str]:
    """Quotes of one fortune file, attribution lines (``-- Someone``) removed, cleaned."""
    entries = []
    for raw in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
        lines = raw.strip("\n").splitlines()
        for i in range(len(lines) - 1, max(len(lines) - 4, 0), -1):
            if re.match(r"^\s*--\s*\S", lines[i]) and i > 0:
                lines = lines[:i]
                break
        text = clean("\n".join(lines))
        if text and text != "%":
            entries.append(text)
    return entries


def usable(text: str) -> bool:
    """Prose of a useful length: enough words, not too long, mostly letters."""
    letters = sum(ch.isalpha() for ch in text)
    return len(text.split()) >= MIN_WORDS and len(text) <= MAX_CHARS and letters >= 0.6 * len(text)


def make_task(name: str, classes: dict[str, list[str]], seed: int) -> dict:
    """Dedupe, filter, shuffle (seeded) and split one task's candidates per class."""
    counts: dict[str, int] = {}
    for texts in classes.values():
        for key in {t.lower() for t in texts}:
            counts[key] = counts.get(key, 0) + 1
    need = sum(PER_CLASS.values())
    splits: dict[str, list[list]] = {s: [] for s in PER_CLASS}
    for label, (cls, texts) in enumerate(classes.items()):
        seen, pool = set(), []
        for t in texts:  # drop texts that repeat, within or across classes
            key = t.lower()
            if usable(t) and counts[key] == 1 and key not in seen:
                seen.add(key)
                pool.append(t)
        if len(pool) < need:
            raise ValueError(f"Task {name!r}, class {cls!r}: {len(pool)} usable texts, need {need}.")
        random.Random(f"{seed}-{name}-{cls}").shuffle(pool)
        start = 0
        for split, n in PER_CLASS.items():
            splits[split] += [[t, label] for t in pool[start:start + n]]
            start += n
    for split, rows in splits.items():  # interleave classes in a seeded order
        random.Random(f"{seed}-{name}-{split}").shuffle(rows)
    return {"labels": list(classes), "examples": splits}


def build(root: Path, versions: dict[str, str]) -> dict:
    """All four tasks from the unpacked packages under ``root``."""
    lex = lexnames(root)
    wn_dir = root / "usr/share/wordnet"
    tasks, cache = {}, {}
    for name, (data_file, classes) in WN_TASKS.items():
        if data_file not in cache:
            cache[data_file] = wordnet_definitions(wn_dir / data_file)
        chosen = {cls: cache[data_file][lex[lexfile]] for cls, lexfile in classes}
        tasks[name] = make_task(name, chosen, SEED)
        tasks[name]["source"] = (
            f"WordNet 3.0 (Debian wordnet-base {versions['wordnet-base']}), synset definitions by "
            "lexicographer file: " + ", ".join(lf for _, lf in classes)
        )
    fort = root / "usr/share/games/fortunes"
    quotes = {c: fortune_entries(fort / c) for c in FORTUNE_CLASSES}
    tasks["fortunes"] = make_task("fortunes", quotes, SEED)
    tasks["fortunes"]["source"] = f"Debian fortunes {versions['fortunes']}: files {', '.join(FORTUNE_CLASSES)}"
    return {"version": 1, "seed": SEED, "per_class": PER_CLASS, "packages": versions, "tasks": tasks}


def write_notices(root: Path, versions: dict[str, str]) -> None:
    """Copy the WordNet licence and write the notice on sources and licences."""
    wn_copy = (root / "usr/share/doc/wordnet-base/copyright").read_text()
    licence = wn_copy[wn_copy.index("License: WordNet3.0"):wn_copy.index("Files: debian/*")]
    body = "\n".join(line[1:] if line.startswith(" ") else line for line in licence.splitlines())
    (OUT / "LICENSE-wordnet.txt").write_text(
        "The WordNet-derived texts in text_tasks.json (tasks wn_noun, wn_noun_b, wn_verb) are\n"
        f"synset definitions from WordNet 3.0 (Debian package wordnet-base {versions['wordnet-base']}).\n"
        "Copyright: (c) 1996-2012 Cognitive Science Laboratory Princeton University\n\n"
        + body.replace("\n.\n", "\n\n").strip() + "\n"
    )
    (OUT / "NOTICE-text-tasks.txt").write_text(NOTICE.format(**versions))


NOTICE = """\
text_tasks.json: sources and licences (generated by scripts/make_text_tasks.py)

wn_noun, wn_noun_b, wn_verb
  Synset definitions (glosses without their quoted examples) from WordNet 3.0, Debian package
  wordnet-base {wordnet-base} (Debian bookworm, main). Licence: the WordNet 3.0 licence, which permits use,
  copying, modification and distribution provided its copyright notice, statements and disclaimer
  appear on all copies: see LICENSE-wordnet.txt (copied from the package's copyright file).

fortunes
  Quotes from the files computers, politics, science and work of the Debian package fortunes
  {fortunes} (Debian bookworm, main; source package fortune-mod), attribution lines ("-- Name") removed and
  whitespace collapsed. What the package's copyright file says: the fortune *program* is under the
  BSD licence (Regents of the University of California, 1991); it gives no licence for the
  quotation files themselves (only a separate note for the atheism file, not used here). The
  upstream Notes file says the quotes were "collected haphazardly from a cacophony of sources",
  that attributions cannot be checked, and that the collection is distributed as fair use.
  Individual quotes may therefore be under third-party copyright; we ship a small, non-commercial,
  research subset (1800 short quotes) for classification only, as Debian main does with the whole
  collection. Remove the fortunes task (and rerun this script without it) if that is not
  acceptable for your distribution.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--debs", type=Path, help="folder with the .deb files (skip apt-get download)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        debs = find_debs(args.debs) if args.debs else fetch_debs(Path(tmp))
        root = Path(tmp) / "root"
        versions = unpack(debs, root)
        data = build(root, versions)
        OUT.mkdir(parents=True, exist_ok=True)
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), sort_keys=False)
        (OUT / "text_tasks.json").write_text(text + "\n", encoding="utf-8")
        write_notices(root, versions)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    print(f"wrote {OUT / 'text_tasks.json'} ({len(text.encode()) / 1e6:.2f} MB, sha256 {digest}...)")


if __name__ == "__main__":
    main()
