"""Session-wide settings of weightlens, set by assignment.

>>> import weightlens as wl
>>> wl.config.progress = False   # no progress bar anywhere, whatever a call asks for
>>> wl.config.progress = "auto"  # the default: bars in notebooks and terminals, for work that takes a while
>>> wl.config.batch = "auto"     # the default: decompositions batched by shape on CUDA, one by one on the CPU
"""

from __future__ import annotations

from typing import Literal

__all__ = ["batch", "progress", "progress_delay"]

#: Progress bars of long calls (merge, analyze, compare, sweep, export, weight matching, lmc):
#: ``"auto"`` shows them in notebooks and terminals (not in logs, pipes or tests) once a call has run
#: ``progress_delay`` seconds; ``True`` shows them wherever a call leaves its ``progress`` at auto;
#: ``False`` turns every bar off, even those a call asks for with ``progress=True``.
progress: bool | Literal["auto"] = "auto"

#: Seconds a call runs before its bar appears under ``"auto"`` (short work shows none).
progress_delay: float = 1.0

#: Decompositions batched by shape ahead of the per-key walks of merges (TSV-M, Iso-C, Iso-CTS, STAR) and
#: ``analyze`` (``weightlens.decompositions.ahead``): ``"auto"`` on CUDA, where one batched call replaces one
#: per matrix, and not on the CPU, where LAPACK decomposes a batch one matrix at a time anyway (no gain,
#: measured); ``True`` everywhere (results on the CPU are bitwise the per-key ones); ``False`` nowhere.
batch: bool | Literal["auto"] = "auto"
