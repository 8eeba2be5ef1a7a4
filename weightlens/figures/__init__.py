"""Pure plotly figure builders: ``figure_*(data, **opts) -> plotly.graph_objects.Figure``.

plotly is imported only here and in :mod:`weightlens.widgets`, so ``import weightlens`` stays light.
Builders for the interference report live in :mod:`weightlens.figures.analysis`.
"""

from weightlens.figures.analysis import (
    figure_conflict_matrix,
    figure_cosines,
    figure_sar_layers,
    figure_sar_matrix,
    figure_sign_conflicts,
    figure_spectra,
    figure_subspace_overlap,
    task_colors,
)

__all__ = [
    "figure_conflict_matrix",
    "figure_cosines",
    "figure_sar_layers",
    "figure_sar_matrix",
    "figure_sign_conflicts",
    "figure_spectra",
    "figure_subspace_overlap",
    "task_colors",
]
