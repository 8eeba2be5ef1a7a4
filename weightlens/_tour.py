"""Execute a notebook headless and write a standalone HTML report (plotly inlined, no CDN).

Used by ``weightlens tour --headless`` on machines without a browser, and by the notebook tests.
The tour notebook is found beside the package (``<checkout>/notebooks/00_tour.ipynb``), not in the
current folder, so the command works from any folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from weightlens.errors import InvalidParameterError
from weightlens.io._atomic import atomic_write_text

_PLOTLY_MIME = "application/vnd.plotly.v1+json"


def execute_notebook(path: Path, *, timeout: int = 900, parameters: dict | None = None):
    """Run every cell of ``path`` in a fresh kernel (cwd = the notebook's folder); return the notebook.

    Widget state is not stored (each plotly FigureWidget would add 5 MB). A failing cell raises
    ``nbclient.exceptions.CellExecutionError`` naming the cell.
    """
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    if parameters:
        source = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
        nb.cells.insert(0, nbformat.v4.new_code_cell(source))
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        store_widget_state=False,
    )
    client.execute()
    return nb


def _inline_plotly(nb) -> None:
    """Give every plotly output an HTML rendering; plotly.js is inlined once, in the first figure."""
    import plotly.io as pio

    first = True
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if _PLOTLY_MIME not in data:
                continue
            fig = pio.from_json(_as_json(data[_PLOTLY_MIME]))
            data["text/html"] = pio.to_html(fig, include_plotlyjs=first, full_html=False)
            first = False


def _as_json(spec) -> str:
    import json

    return spec if isinstance(spec, str) else json.dumps(spec)


#: The zoos the tour can show; ``$WEIGHTLENS_TOUR_ZOO`` picks one (default: the first, full fine-tunes).
TOUR_CHOICES = ("minilm-tasks", "minilm-lora")


def tour_zoo() -> str:
    """The zoo the tour notebook loads: ``$WEIGHTLENS_TOUR_ZOO`` when set, else ``"minilm-tasks"``."""
    name = os.environ.get("WEIGHTLENS_TOUR_ZOO") or TOUR_CHOICES[0]
    if name not in TOUR_CHOICES:
        raise InvalidParameterError(
            f"WEIGHTLENS_TOUR_ZOO must be one of {', '.join(TOUR_CHOICES)}. Got {name!r} instead; unset it for "
            f"{TOUR_CHOICES[0]}."
        )
    return name


def __getattr__(name: str) -> tuple[str, ...]:
    if name == "TOUR_ZOOS":  # the zoos the tour notebook loads, read from the environment when asked
        return (tour_zoo(),)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tour_notebook() -> Path:
    """``notebooks/00_tour.ipynb`` of the checkout weightlens is installed from (editable install).

    Found from the package's own location, so the current folder does not matter. A copy installed
    without its checkout has no notebook: ``FileNotFoundError`` says to pass one.
    """
    path = Path(__file__).resolve().parents[1] / "notebooks" / "00_tour.ipynb"
    if not path.is_file():
        raise FileNotFoundError(
            f"No tour notebook at {path}: it ships with the weightlens source checkout (installed with "
            "./dev.sh or pip install -e), not with this installed copy. Pass --notebook PATH/00_tour.ipynb."
        )
    return path


def run_tour(notebook: Path | None, out: Path, *, headless: bool = True) -> Path:
    """Execute ``notebook`` (default :func:`tour_notebook`) and write it as one standalone HTML page at ``out``."""
    from nbconvert import HTMLExporter

    notebook = tour_notebook() if notebook is None else Path(notebook)
    if not headless:
        raise SystemExit(f"Interactive tour: run `./dev.sh tour`, or `jupyter lab {notebook}`. Use --headless "
                         "here to execute it into an HTML page.")
    os.environ.setdefault("WEIGHTLENS_HEADLESS", "1")
    nb = execute_notebook(Path(notebook))
    _inline_plotly(nb)
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out, body)
