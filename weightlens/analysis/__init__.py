"""Interference analysis of task vectors: spectra, singular-vector alignment, sign conflicts.

The entry point is :func:`analyze` (``Report`` with tidy pandas tables, summaries, figures and a
standalone HTML page). Underneath are pure functions on tensors, each following
``docs/methods.md`` (spectra, SAR, STI, principal angles, sign conflicts):

* :mod:`~weightlens.analysis.spectra`: :func:`spectrum_metrics`, :func:`rank_for_energy`,
  :func:`effective_rank`;
* :mod:`~weightlens.analysis.alignment`: :func:`sar`, :func:`sti`, :func:`principal_angles`,
  :func:`subspace_overlap`, :func:`alignment_to_merged` (SAR against any merged delta);
* :mod:`~weightlens.analysis.signs`: :func:`conflict_stats`, :func:`pairwise_conflicts`, TIES
  trimming.

Their decompositions are cached in ``tv.cache`` by :mod:`weightlens.decompositions`.
"""

from weightlens.analysis.alignment import (
    alignment_to_merged,
    cosine_matrix,
    grassmann_distance,
    overlap_chance,
    principal_angles,
    sar,
    sar_curve,
    sar_curves,
    sti,
    subspace_overlap,
)
from weightlens.analysis.report import AnalysisOptions, Report, analyze, block_of
from weightlens.analysis.signs import (
    chance_conflict,
    conflict_stats,
    global_thresholds,
    pairwise_conflicts,
    ties_threshold,
    trim,
)
from weightlens.analysis.spectra import effective_rank, rank_for_energy, spectrum_metrics

__all__ = [
    "AnalysisOptions",
    "Report",
    "alignment_to_merged",
    "analyze",
    "block_of",
    "chance_conflict",
    "conflict_stats",
    "cosine_matrix",
    "effective_rank",
    "global_thresholds",
    "grassmann_distance",
    "overlap_chance",
    "pairwise_conflicts",
    "principal_angles",
    "rank_for_energy",
    "sar",
    "sar_curve",
    "sar_curves",
    "spectrum_metrics",
    "sti",
    "subspace_overlap",
    "ties_threshold",
    "trim",
]
