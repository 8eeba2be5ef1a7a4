"""Pure plotly figure builders: ``figure_*(data, **opts) -> plotly.graph_objects.Figure``.

plotly is imported only here and in :mod:`weightlens.widgets`, so ``import weightlens`` stays light.
One module per subject: :mod:`~weightlens.figures.analysis` (the interference report),
:mod:`~weightlens.figures.merge` (merges against task arithmetic, sweeps),
:mod:`~weightlens.figures.task_accuracy` (per-task accuracy), :mod:`~weightlens.figures.diagnosis`
(why a merge lost a task), :mod:`~weightlens.figures.lmc` (interpolation curves) and
:mod:`~weightlens.figures.rebasin` (what a permutation did); every builder is also importable from here.
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
from weightlens.figures.diagnosis import figure_block_costs
from weightlens.figures.lmc import figure_lmc
from weightlens.figures.merge import (
    figure_merge_conflicts,
    figure_merge_spectrum,
    figure_retained_alignment,
    figure_sweep,
)
from weightlens.figures.rebasin import (
    figure_barriers,
    figure_layer_distances,
    figure_permutations,
    figure_singular_alignment,
)
from weightlens.figures.task_accuracy import figure_task_accuracy

__all__ = [
    "figure_barriers",
    "figure_block_costs",
    "figure_conflict_matrix",
    "figure_cosines",
    "figure_layer_distances",
    "figure_lmc",
    "figure_merge_conflicts",
    "figure_merge_spectrum",
    "figure_permutations",
    "figure_retained_alignment",
    "figure_sar_layers",
    "figure_sar_matrix",
    "figure_sign_conflicts",
    "figure_singular_alignment",
    "figure_spectra",
    "figure_subspace_overlap",
    "figure_sweep",
    "figure_task_accuracy",
    "task_colors",
]
