"""The import rules of ``docs/ARCHITECTURE.md``, read from its tables and held against the code.

The doc is the rule: its *Package map* says which rows a module may import, *Narrow imports* which
file may import what of a narrow or private module, and *Where plotly, ipywidgets and ray are imported*
which rows may import those two. Every ``.py`` file under ``weightlens/`` is read with ``ast``
(imports at module level and inside functions, ``import x``, ``from x import y``, relative imports),
and every import of weightlens or of plotly/ipywidgets/ray must be allowed there. The tables must also
be current: every package and top-level module has a row, every row names one that exists, and
every permission is used. (``import weightlens`` loading neither plotly nor ipywidgets is
``tests/test_api.py::test_import_is_light``.)
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "weightlens"
DOC = ROOT / "docs" / "ARCHITECTURE.md"
FIX = "docs/ARCHITECTURE.md"


# ------------------------------------------------------------------------------------------- the doc
def _table(heading: str) -> list[list[str]]:
    """The cells of the first markdown table after the line ``heading`` (header and rule dropped)."""
    lines = DOC.read_text().splitlines()
    assert heading in lines, f"{FIX} has no heading {heading!r}"
    rows, started = [], False
    for line in lines[lines.index(heading) + 1:]:
        if line.startswith("|"):
            started = True
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif started:
            break
    assert len(rows) > 2, f"{FIX}: no table under {heading!r}"
    width = len(rows[0])
    bad = [r for r in rows if len(r) != width]
    assert not bad, f"{FIX}: rows under {heading!r} with a '|' inside a cell: {bad}"
    return rows[2:]


def _full(name: str) -> str:
    return name if name == "weightlens" or name.startswith("weightlens.") else f"weightlens.{name}"


def _ticked(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def _items(cell: str) -> list[str]:
    """``cell`` split at the commas outside parentheses."""
    items, depth, cur = [], 0, ""
    for ch in cell:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    return [i.strip() for i in items + [cur] if i.strip()]


@dataclass(frozen=True)
class Row:
    modules: tuple[str, ...]        # full names of the units in the row
    allowed: dict[str, bool]        # unit it may import -> narrow ("only ...": see Narrow imports)


@functools.lru_cache(maxsize=None)
def package_map() -> tuple[Row, ...]:
    rows = []
    for module_cell, _owns, may in _table("## Package map"):
        modules = tuple(_full(m) for m in _ticked(module_cell))
        assert modules, f"{FIX}: a package-map row names no module: {module_cell!r}"
        allowed: dict[str, bool] = {}
        if may != "nothing":
            for item in _items(may):
                m = re.fullmatch(r"`([\w.]+)`\s*(?:\((.*)\))?", item, re.S)
                assert m, (f"{FIX}: in the may-import cell of {module_cell}, {item!r} is not "
                           "`name` or `name` (note)")
                allowed[_full(m[1])] = bool(m[2]) and m[2].strip().startswith("only")
        rows.append(Row(modules, allowed))
    return tuple(rows)


@functools.lru_cache(maxsize=None)
def narrow_imports() -> tuple[tuple[str, str], ...]:
    out = []
    for importer, imported, _why in _table("### Narrow imports"):
        (a,), (b,) = _ticked(importer), _ticked(imported)
        out.append((_full(a), _full(b)))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def third_party() -> dict[str, tuple[str, ...]]:
    return {_ticked(pkg)[0]: tuple(_full(u) for u in _ticked(where))
            for pkg, where in _table("### Where plotly, ipywidgets and ray are imported")}


def row_of(unit: str) -> Row:
    """The row of ``unit``; a unit without one allows nothing (the first test names it)."""
    return next((r for r in package_map() if unit in r.modules), Row((unit,), {}))


# ------------------------------------------------------------------------------------------ the code
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.lru_cache(maxsize=None)
def modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def unit(module: str) -> str:
    """The package-map unit of a module: ``weightlens`` itself, or ``weightlens.<top-level name>``."""
    return ".".join(module.split(".")[:2])


def is_private(module: str) -> bool:
    """A module named ``_x`` inside a subpackage (``weightlens.io._atomic``)."""
    return any(p.startswith("_") for p in module.split(".")[2:])


@dataclass(frozen=True)
class Import:
    importer: str
    where: str       # path:line, for messages
    target: str      # the module imported: weightlens.x.y, or a third-party module


def read_imports(source: str, package: str, known) -> list[tuple[int, str]]:
    """``(line, module)`` for every import in ``source``, a module of package ``package``.

    ``from x import y`` imports ``x.y`` when that is a module in ``known``, else ``x``; relative
    imports are resolved against ``package``.
    """
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x, from ..io import y
                parts = package.split(".")
                mod = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # from weightlens import linalg imports weightlens.linalg
                sub = f"{mod}.{a.name}"
                out.append((node.lineno, sub if sub in known else mod))
    return out


@functools.lru_cache(maxsize=None)
def imports() -> tuple[Import, ...]:
    known = modules()
    out = []
    for me, path in known.items():
        package = me if path.name == "__init__.py" else me.rpartition(".")[0]
        out += [Import(me, f"{path.relative_to(ROOT)}:{line}", target)
                for line, target in read_imports(path.read_text(), package, known)]
    return tuple(out)


def internal_imports() -> list[Import]:
    """Imports of weightlens modules outside the importer's own package."""
    return [i for i in imports() if (i.target == "weightlens" or i.target.startswith("weightlens."))
            and unit(i.target) != unit(i.importer)]


def _covered(imp: Import, rule: tuple[str, str]) -> bool:
    importer, imported = rule
    inside = (imp.importer == importer or imp.importer.startswith(importer + "."))
    return inside and (imp.target == imported or imp.target.startswith(imported + "."))


# ----------------------------------------------------------------------------------------- the tests
def test_every_package_and_top_level_module_has_a_row_and_every_row_exists():
    units = {unit(m) for m in modules()}
    rows = [m for r in package_map() for m in r.modules]
    assert len(rows) == len(set(rows)), f"{FIX}: a module has two rows: {sorted(rows)}"
    missing = sorted(units - set(rows))
    assert not missing, f"no row in {FIX}'s package map for {missing}: add one (what it owns, what it may import)"
    absent = sorted(set(rows) - units)
    assert not absent, f"{FIX}'s package map has rows for modules that do not exist: {absent}"
    named = {u for r in package_map() for u in r.allowed} | {u for pkg in third_party().values() for u in pkg}
    assert not named - set(rows), f"{FIX} names modules that have no row: {sorted(named - set(rows))}"
    for importer, imported in narrow_imports():
        for name in (importer, imported):
            assert name in modules(), f"{FIX}: Narrow imports names {name}, which does not exist"


def test_every_weightlens_import_is_allowed_by_the_package_map():
    wrong = []
    for imp in internal_imports():
        row, target_unit = row_of(unit(imp.importer)), unit(imp.target)
        if target_unit not in row.allowed:
            wrong.append(f"{imp.where}: {imp.importer} imports {imp.target}, and the row of "
                         f"{unit(imp.importer)} does not list `{target_unit.removeprefix('weightlens.')}`")
        elif (row.allowed[target_unit] or is_private(imp.target)) and not any(
                _covered(imp, rule) for rule in narrow_imports()):
            why = "a private module" if is_private(imp.target) else f"narrow for {unit(imp.importer)}"
            wrong.append(f"{imp.where}: {imp.importer} imports {imp.target} ({why}), and no row of "
                         "Narrow imports covers it")
    wrong = list(dict.fromkeys(wrong))  # one line per import statement, not per imported name
    assert not wrong, (f"imports that {FIX} does not allow (import something allowed instead, or change "
                       "the doc if the layering really is meant to change):\n" + "\n".join(wrong))


def test_every_permission_in_the_doc_is_used():
    used = {(unit(i.importer), unit(i.target)) for i in internal_imports()}
    stale = [f"{m} may import {u}" for r in package_map() for m in r.modules for u in r.allowed
             if not any((mm, u) in used for mm in r.modules)]
    stale = sorted(set(stale))
    stale += [f"Narrow imports: {a} -> {b}" for a, b in narrow_imports()
              if not any(_covered(i, (a, b)) for i in internal_imports())]
    assert not stale, f"{FIX} allows imports that no module makes any more (drop them):\n" + "\n".join(stale)


def test_plotly_ipywidgets_and_ray_are_imported_only_where_the_doc_says():
    rule = third_party()
    assert set(rule) == {"plotly", "ipywidgets", "ray"}, rule
    wrong, seen = [], set()
    for imp in imports():
        top = imp.target.split(".")[0]
        if top in rule:
            seen.add((top, unit(imp.importer)))
            if unit(imp.importer) not in rule[top]:
                wrong.append(f"{imp.where}: {imp.importer} imports {imp.target}")
    assert not wrong, f"{FIX} keeps plotly, ipywidgets and ray to {rule}:\n" + "\n".join(wrong)
    stale = [(pkg, u) for pkg, units in rule.items() for u in units if (pkg, u) not in seen]
    assert not stale, f"{FIX} says these import plotly/ipywidgets/ray, and they do not: {stale}"


def test_the_reader_sees_every_kind_of_import():
    known = {"weightlens.linalg", "weightlens.io", "weightlens.io._atomic", "weightlens.merge.engine"}
    source = (
        "import weightlens.io\n"
        "from weightlens import linalg, __version__\n"
        "from . import engine\n"
        "from ..io import _atomic, load\n"
        "def f():\n"
        "    import plotly.graph_objects as go\n"
        "    from weightlens.io._atomic import write_text\n"
    )
    got = [t for _, t in read_imports(source, "weightlens.merge", known)]
    assert got == ["weightlens.io", "weightlens.linalg", "weightlens", "weightlens.merge.engine",
                   "weightlens.io._atomic", "weightlens.io", "plotly.graph_objects", "weightlens.io._atomic"]
    # and on the real tree: an import inside a method, and `from weightlens import linalg`
    assert any(i.importer == "weightlens.analysis.report" and i.target == "weightlens.figures.analysis"
               for i in imports())
    assert any(i.importer == "weightlens.analysis.alignment" and i.target == "weightlens.linalg" for i in imports())
