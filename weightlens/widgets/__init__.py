"""Thin ipywidgets views for JupyterLab: controls wired to the analysis and merge functions.

* :class:`InterferenceDashboard`: spectra, alignment and sign conflicts by task and block;
* :class:`MergeStudio`: method, parameters and tasks; before/after panels, accuracy, export;
* :class:`LMCExplorer`: naive vs matched interpolation between two models (settings in
  :class:`LMCExplorerOptions`, results already computed in :class:`LMCExplorerResults`).

Each class is imported on first use, so ``import weightlens`` (and ``import weightlens.widgets``)
loads neither plotly nor ipywidgets.

Examples
--------
>>> from weightlens.widgets import MergeStudio            # doctest: +SKIP
>>> MergeStudio(tv, evaluate=zoo_.evaluate)              # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["InterferenceDashboard", "LMCExplorer", "LMCExplorerOptions", "LMCExplorerResults", "MergeStudio",
           "StudioOptions"]

_HOME = {
    "InterferenceDashboard": "weightlens.widgets.dashboard",
    "MergeStudio": "weightlens.widgets.studio",
    "StudioOptions": "weightlens.widgets.studio",
    "LMCExplorer": "weightlens.widgets.lmc",
    "LMCExplorerOptions": "weightlens.widgets.lmc",
    "LMCExplorerResults": "weightlens.widgets.lmc",
}

if TYPE_CHECKING:
    from weightlens.widgets.dashboard import InterferenceDashboard
    from weightlens.widgets.lmc import LMCExplorer, LMCExplorerOptions, LMCExplorerResults
    from weightlens.widgets.studio import MergeStudio, StudioOptions


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'weightlens.widgets' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
