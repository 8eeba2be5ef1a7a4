"""The model card (``README.md``) of an export and its small figure (a hand-written SVG, no plotting stack).

The card says what was merged and how (method, parameters, sources), what is known of the result
(per-task metrics and an interference summary when the caller gives them), which head it carries and
the heads of every task, how far each block moved from the base (the figure), how to reproduce it
(weightlens recipe, mergekit config) and the files with their sha256.

Its front matter is what the Hugging Face Hub reads: for a merge, ``base_model`` (the inputs: a Hub id
when one is known, else the path the recipe records) with ``base_model_relation: merge`` and the tags
``weightlens`` and ``merge``; ``library_name: transformers`` when a ``config.json`` is written. Weights
that are not a merge (a Re-Basin output, a state dict) are tagged ``weightlens`` only.

Every string that comes from the user or the inputs (titles, notes, task and parameter names and
values, paths, metrics, tensor keys, copied file names, a method name not from the registry) goes
through :func:`md_text`: HTML-escaped and with Markdown's table, link and code syntax neutralised,
so a task named ``<img src=x onerror=...>`` shows as text and cannot add markup, links or rows.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from weightlens.errors import InvalidParameterError
from weightlens.io._atomic import write_text
from weightlens.io._layout import CARD, FIGURE, MERGEKIT, RECIPE, ExportLayout, WrittenWeights, dtype_name
from weightlens.io.keys import block_of
from weightlens.io.sources import _display_name
from weightlens.io.recipe import ExportRecipe, Recipe, _model_path, _version as file_version, mergekit_config

__all__ = ["CardFiles", "block_changes", "check_extras", "md_text", "svg_bars", "write_card"]

_EXTRAS = ("title", "metrics", "report", "notes")

_MAX_BARS = 60
# Markdown's table (|), code (`) and link ([ ]) syntax, and the backslash that escapes them.
_MARKDOWN = str.maketrans({c: "\\" + c for c in "\\|`[]"})
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_PLAIN_PATH = re.compile(r"[A-Za-z0-9_./~+@=-]{1,1000}")  # a base_model entry: an id or a path of plain characters


class _Markup(str):
    """Card text written by weightlens itself (a sha256 in a code span): a table passes it as is."""


def md_text(value: Any) -> str:
    """``value`` as one line of inert card text: HTML-escaped, ``| ` [ ] \\`` backslash-escaped.

    Quotes are kept: they matter only inside an HTML tag, and no tag can be opened (``<`` is escaped).
    """
    line = " ".join(str(value).splitlines())
    return html.escape(line, quote=False).translate(_MARKDOWN)


def _fmt(value: Any) -> str:
    if isinstance(value, _Markup):
        return str(value)
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return md_text(value)


def markdown_table(table: Any, index_name: str = "") -> str:
    """A Markdown table from a DataFrame or ``{row: {column: value}}``."""
    if hasattr(table, "to_dict") and hasattr(table, "columns"):
        index_name = index_name or (table.index.name or "")
        table = {idx: row for idx, row in table.to_dict(orient="index").items()}
    rows = {str(k): dict(v) if isinstance(v, Mapping) else {"value": v} for k, v in dict(table).items()}
    columns = list(dict.fromkeys(c for r in rows.values() for c in r))
    lines = ["| " + " | ".join([md_text(index_name) or " "] + [_fmt(c) for c in columns]) + " |",
             "|" + "---|" * (len(columns) + 1)]
    lines += ["| " + " | ".join([_fmt(k)] + [_fmt(r.get(c, "")) for c in columns]) + " |" for k, r in rows.items()]
    return "\n".join(lines)


def block_changes(moved: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """``{block: ||w - w_base|| / ||w_base||}`` over the keys of each block, in key order."""
    sums: dict[str, list[float]] = {}
    for key, (num, den) in moved.items():
        acc = sums.setdefault(block_of(key), [0.0, 0.0])
        acc[0] += num
        acc[1] += den
    return {b: math.sqrt(n / d) if d > 0 else math.nan for b, (n, d) in sums.items()}


def svg_bars(labels: Sequence[str], values: Sequence[float], *, title: str) -> str:
    """A horizontal bar chart as a standalone SVG string."""
    labels, values = list(labels)[:_MAX_BARS], [0.0 if not math.isfinite(v) else v for v in values][:_MAX_BARS]
    row, left, width, top = 16, 12 + 6.2 * max((len(s) for s in labels), default=4), 260, 28
    height = top + row * len(labels) + 10
    vmax = max(values, default=0.0) or 1.0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 80:.0f}" height="{height}" '
        'font-family="sans-serif" font-size="11">',
        f'<text x="4" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>',
    ]
    for i, (label, value) in enumerate(zip(labels, values)):
        y = top + i * row
        w = width * value / vmax
        parts += [
            f'<text x="{left - 6:.0f}" y="{y + 11}" text-anchor="end">{html.escape(label)}</text>',
            f'<rect x="{left:.0f}" y="{y + 2}" width="{w:.1f}" height="{row - 4}" fill="#4c78a8"/>',
            f'<text x="{left + w + 4:.1f}" y="{y + 11}">{value:.3g}</text>',
        ]
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _is_merge(merged: Any) -> bool:
    """Whether ``merged`` is a merge result (its method, parameters and inputs are known)."""
    return all(hasattr(merged, a) for a in ("method", "params", "task_vectors"))


def _method_line(method: str, merged: Any) -> str:
    """The method's name for the card; pretty name and reference from a merge result's registry entry."""
    spec = getattr(merged, "spec", None)
    if getattr(spec, "name", None) != method:  # plain weights with a recipe: its name, as text
        return md_text(method)
    ref = f" ({spec.reference})" if spec.reference else ""
    return f"**{spec.pretty_name}** (`{method}`){ref}"


def _sources(merged: Any, recipe: Recipe | None) -> dict[str, dict[str, str]]:
    if recipe is not None:
        rows = {"base": {"name": _display_name(Path(recipe.base)), "path": recipe.base}}
        rows.update({f"fine-tune {n}": {"name": n, "path": p} for n, p in recipe.finetuned.items()})
        return rows
    tv = merged.task_vectors
    rows = {"base": {"name": tv.base.name, "path": str(tv.base.source)}}
    rows.update({f"fine-tune {n}": {"name": n, "path": str(c.source)} for n, c in tv.finetuned.items()})
    return rows


def _base_models(merged: Any, recipe: Any, layout: ExportLayout | None) -> list[str]:
    """The merge's inputs for ``base_model``: each one's Hub id when known, else the model folder (or file)
    the recipe records; without a recipe, the Hub ids alone (no paths of this machine)."""
    hub = dict(layout.hub_ids) if layout is not None else {}
    base, finetuned = getattr(recipe, "base", None), getattr(recipe, "finetuned", None)
    if isinstance(base, str) and isinstance(finetuned, Mapping):
        paths = {"base": base, **finetuned}
        found = [hub.get(role) or _model_path(path, recipe.path(path))[0] for role, path in paths.items()]
    elif _is_merge(merged):
        found = [hub[role] for role in ("base", *merged.task_vectors.finetuned) if role in hub]
    else:
        return []
    return list(dict.fromkeys(p for p in found if _PLAIN_PATH.fullmatch(p)))  # no markup, even quoted


def _header(merged: Any, recipe: Recipe | None, copied: Sequence[str], extras: Mapping[str, Any],
            layout: ExportLayout | None = None) -> list[str]:
    method = recipe.method if recipe is not None else getattr(merged, "method", None)
    is_merge = recipe is not None or _is_merge(merged)
    tags = ["weightlens"] + (["merge"] + ([method] if method and _TAG.fullmatch(method) else []) if is_merge else [])
    front = ["---"]
    parents = _base_models(merged, recipe, layout) if is_merge else []
    if parents:  # quoted by the YAML writer: a path cannot add fields
        front += yaml.safe_dump({"base_model": parents}, default_flow_style=False, allow_unicode=True,
                                width=10**6).splitlines()
        front.append("base_model_relation: merge")
    if "config.json" in copied:
        front.append("library_name: transformers")
    front += ["tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    title = extras.get("title") or (f"{method} merge" if method else "weightlens export")
    return front + [f"# {md_text(title)}", ""]


def _merge_section(merged: Any, recipe: Recipe | None) -> list[str]:
    if recipe is None and not _is_merge(merged):
        return ["These weights were exported by weightlens; no merge method or inputs are recorded.", ""]
    method = recipe.method if recipe is not None else merged.method
    params = recipe.params if recipe is not None else merged.params
    sources = _sources(merged, recipe)
    n = len(sources) - 1
    lines = [f"A merge of {n} fine-tune{'s' if n != 1 else ''} of one base model with {_method_line(method, merged)}, "
             f"made with weightlens {file_version()}.", "",
             "## Merge", "", markdown_table({k: {"value": v} for k, v in params.items()}, "parameter"), ""]
    if recipe is not None and (recipe.include or recipe.exclude):
        lines += [md_text(f"Keys merged: include={recipe.include}, exclude={recipe.exclude}; the rest is the "
                          "base's."), ""]
    lines += ["## Sources", "", markdown_table(sources, "role"), ""]
    return lines


def _layout_section(layout: ExportLayout | None) -> list[str]:
    """Which head the export carries, the heads of every task, and the vocabulary."""
    if layout is None or not (layout.head is not None or any(layout.heads.values()) or layout.notes):
        return []
    lines = ["## Heads and vocabulary", ""]
    if layout.head is not None:
        lines += [f"Carries the head of fine-tune {md_text(layout.head)}: the merged weights under its key names, "
                  f"its {len(layout.extras)} key(s) that the base lacks, and its config.json, so the folder loads "
                  "as that fine-tune's model class.", ""]
    elif any(layout.heads.values()):
        lines += ["Carries no head: the base's keys and config. Keys only a fine-tune has (task heads) are never "
                  "merged; export `merged.with_head(task)` to carry one.", ""]
    if any(layout.heads.values()):
        rows = {t: {"head keys": ", ".join(keys) or "none", "carried": "yes" if t == layout.head else "no"}
                for t, keys in layout.heads.items()}
        lines += [markdown_table(rows, "task"), ""]
    lines += [md_text(note) for note in layout.notes]
    return lines + ([""] if layout.notes else [])


def _known_section(merged: Any, extras: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    if extras.get("metrics") is not None:
        lines += ["## Evaluation", "", markdown_table(extras["metrics"], "task"), ""]
    report = extras.get("report")
    if report is not None:
        summary = report.summary() if hasattr(report, "summary") else report
        if hasattr(summary, "columns"):
            summary = summary[[c for c in ("plain", "weighted", "chance") if c in summary.columns]]
        lines += ["## Interference (task vectors)", "", markdown_table(summary, "metric"), ""]
    if _is_merge(merged):  # the export read every key, so its notes are known: nothing is recomputed
        notes = merged.notes
        if len(notes):
            shown = [f"- {md_text(r.key)}: {md_text(r.note)}" for r in notes.head(10).itertuples()]
            more = [f"- ... and {len(notes) - 10} more"] if len(notes) > 10 else []
            lines += ["## Degenerate cases", ""] + shown + more + [""]
    if extras.get("notes"):
        paragraphs = [md_text(p) for p in re.split(r"\n\s*\n", str(extras["notes"])) if p.strip()]
        lines += ["## Notes", ""] + [line for p in paragraphs for line in (p, "")]
    return lines


def _figure_section(folder: Path, written: WrittenWeights) -> list[str]:
    if not written.moved:
        return []
    changes = block_changes(written.moved)
    write_text(folder / FIGURE, svg_bars(list(changes), list(changes.values()),
                                         title="relative change per block: ||w - w_base|| / ||w_base||"))
    more = f" (first {_MAX_BARS} of {len(changes)} blocks)" if len(changes) > _MAX_BARS else ""
    return ["## How far each block moved", "",
            f"![relative change per block]({FIGURE})", "",
            f"Relative change of the merged weights from the base, per block{more}, over the keys the "
            "merge updated (tensors above 2^20 entries measured on an evenly strided sample of them).", ""]


def _reproduce_section(plan: ExportRecipe, base_dtype: str | None) -> list[str]:
    lines = ["## Reproduce", ""]
    recipe = plan.recipe
    if recipe is None:
        return lines + [f"No recipe was written: {md_text(plan.why_not)}.", ""]
    lines += [f"- weightlens: `weightlens merge {RECIPE} --out OUT_DIR` re-runs this merge and export; on "
              f"the same device ({md_text(recipe.device)}) the weight files are bitwise identical (their "
              "sha256 are in the recipe's `expect`)."]
    mk = mergekit_config(recipe, plan.mergekit, base_dtype=base_dtype)
    if mk is not None:
        lines.append(f"- mergekit: `mergekit-yaml {MERGEKIT} OUT_DIR`. {md_text(mk[1])}")
    elif plan.from_merge:
        lines.append(f"- mergekit has no equivalent of {md_text(recipe.method)} with these parameters.")
    else:
        lines.append("- mergekit: no `mergekit_config.yml`; it is written for the export of a merge result.")
    return lines + [""]


@dataclass(frozen=True)
class CardFiles:
    """What the card's *Files* section lists: the files an export wrote and the ``like`` files.

    Attributes
    ----------
    written : the weight files written (names, sha256, sizes, how far each key moved).
    dtype : the dtype floating tensors were cast to (None: kept).
    copied : files copied from the ``like`` folder.
    skipped : files of that folder not copied (a link leading out of it, or not a regular file).
    layout : what the merge said about the folder (head, vocabulary), or None.
    origins : ``{file: folder}`` of the copied files taken from another folder than ``like``.
    tokenizer : the union tokenizer's files, written by the merge.
    """

    written: WrittenWeights
    dtype: torch.dtype | None = None
    copied: Sequence[str] = ()
    skipped: Sequence[str] = ()
    layout: ExportLayout | None = None
    origins: Mapping[str, str] = field(default_factory=dict)
    tokenizer: Sequence[str] = ()


def _files_section(files: CardFiles) -> list[str]:
    written, dtype = files.written, files.dtype
    rows = {name: {"sha256": _Markup(f"`{sha}`")} for name, sha in written.files.items()}
    cast = f", cast to {dtype_name(dtype)}" if dtype is not None else ""
    lines = ["## Files", "", f"{written.n_tensors} tensors, {written.total_size / 1e6:.1f} MB{cast}.", "",
             markdown_table(rows, "file"), ""]
    own = [n for n in files.copied if n not in files.origins]
    if own:
        lines += ["Copied from the `like` model folder (by default the carried head's or the base's; only its "
                  "config, tokenizer, processor, chat template and licence files, never its weights): "
                  + ", ".join(map(md_text, own)) + ".", ""]
    moved = [n for n in files.copied if n in files.origins]
    for what, names in (("the carried head's folder", [n for n in moved if n == "config.json"]),
                        ("the base's folder (the merged vocabulary is the base's)",
                         [n for n in moved if n != "config.json"])):
        if names:
            lines += [f"Copied from {what}: " + ", ".join(map(md_text, names)) + ".", ""]
    if files.layout is not None and files.layout.config and "config.json" in files.copied:
        fields = ", ".join(f"{md_text(k)} = {md_text(v)}" for k, v in files.layout.config.items())
        lines += [f"Set in config.json: {fields}.", ""]
    if files.tokenizer:
        lines += ["Written by weightlens: the union tokenizer (the base's tokenizer and every token the fine-tunes "
                  "added, at its merged row): " + ", ".join(map(md_text, files.tokenizer)) + ".", ""]
    if files.skipped:
        lines += ["Not copied from that folder (a symbolic link leading out of it, or not a regular file): "
                  + ", ".join(map(md_text, files.skipped)) + ".", ""]
    return lines


def check_extras(extras: Any) -> Mapping[str, Any]:
    """Validate the ``card=`` argument of ``export`` before anything is written."""
    if extras is None:
        return {}
    if not isinstance(extras, Mapping) or set(extras) - set(_EXTRAS):
        got = sorted(set(extras) - set(_EXTRAS)) if isinstance(extras, Mapping) else type(extras).__name__
        raise InvalidParameterError(
            f"The 'card' parameter must be a mapping with keys among {', '.join(_EXTRAS)}. Got {got!r} instead."
        )
    return extras


def write_card(folder: Path, merged: Any, plan: ExportRecipe, files: CardFiles, extras: Mapping[str, Any], *,
               base_dtype: str | None = None) -> None:
    """Write ``README.md`` (and the figure) into ``folder``; ``plan`` is what the export knows of the merge,
    ``files`` what it wrote, ``base_dtype`` the dtype named in the mergekit config."""
    recipe = plan.recipe
    lines = _header(merged, recipe, files.copied, extras, files.layout)
    lines += _merge_section(merged, recipe)
    lines += _layout_section(files.layout)
    lines += _known_section(merged, extras)
    lines += _figure_section(folder, files.written)
    lines += _reproduce_section(plan, base_dtype)
    lines += _files_section(files)
    write_text(folder / CARD, "\n".join(lines).rstrip() + "\n")
