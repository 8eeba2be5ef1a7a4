"""One place that decides whether a long call shows a progress bar, and how it ends.

Every long call takes ``progress: bool | None = None``: None follows ``weightlens.config.progress``
(``"auto"``: on in a notebook or terminal, after ``config.progress_delay`` seconds), True asks for a bar,
False refuses one; ``config.progress = False`` silences all of them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

from weightlens import config
from weightlens.errors import InvalidParameterError

__all__ = ["bar", "finish", "interactive", "wanted"]

T = TypeVar("T")


def interactive() -> bool:
    """True in a Jupyter kernel or when standard error is a terminal."""
    shell = sys.modules.get("IPython")
    if shell is not None:
        ip = getattr(shell, "get_ipython", lambda: None)()
        if ip is not None and getattr(ip, "kernel", None) is not None:
            return True
    stream = sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def wanted(progress: bool | None) -> tuple[bool, float]:
    """``(show a bar, seconds before it appears)`` for a call's ``progress`` under ``config.progress``."""
    setting = config.progress
    if setting not in (True, False, "auto"):
        raise InvalidParameterError(
            f"The 'weightlens.config.progress' setting must be True, False or 'auto'. Got {setting!r} instead."
        )
    if progress is not None and not isinstance(progress, bool):
        raise InvalidParameterError(f"The 'progress' parameter must be True, False or None. Got {progress!r} instead.")
    if setting is False or progress is False:
        return False, 0.0
    if progress is True or setting is True:
        return True, 0.0
    return interactive(), float(config.progress_delay)


def bar(iterable: Iterable[T] | None = None, *, progress: bool | None, desc: str, **kwargs: Any) -> tqdm:
    """A tqdm bar (notebook widget in Jupyter) shown as :func:`wanted` decides; ``kwargs`` go to tqdm."""
    show, delay = wanted(progress)
    return tqdm(iterable, desc=desc, disable=not show, delay=delay, **kwargs)


def finish(progress_bar: tqdm) -> None:
    """End a bar that stopped before its total (a matching that converged early) as complete, and close it."""
    if progress_bar.total is not None and progress_bar.n < progress_bar.total:
        progress_bar.total = progress_bar.n
        progress_bar.refresh()
    progress_bar.close()
