"""Progress bars: one rule (``weightlens._progress``), one switch (``weightlens.config.progress``).

Long calls default to ``progress=None``: a bar in notebooks and terminals once the call has run a
moment, none in logs and tests; ``config.progress = False`` silences every bar; a bar that stops early
(weight matching that converged) ends complete.
"""

from __future__ import annotations

import re

import pytest

import weightlens as wl
from weightlens import _progress, rebasin
from weightlens.errors import InvalidParameterError


@pytest.fixture
def settings():
    """Restore ``wl.config`` after a test changes it."""
    saved = (wl.config.progress, wl.config.progress_delay)
    yield wl.config
    wl.config.progress, wl.config.progress_delay = saved


def test_the_rule(settings, monkeypatch):
    monkeypatch.setattr(_progress, "interactive", lambda: False)
    assert _progress.wanted(None) == (False, settings.progress_delay)  # auto, in a log: none
    assert _progress.wanted(True)[0] and not _progress.wanted(False)[0]
    monkeypatch.setattr(_progress, "interactive", lambda: True)
    assert _progress.wanted(None) == (True, settings.progress_delay)  # auto, interactive: after the delay
    settings.progress = False
    assert not _progress.wanted(True)[0] and not _progress.wanted(None)[0]  # the switch wins
    settings.progress = True
    assert _progress.wanted(None) == (True, 0.0)
    settings.progress = "yes"
    with pytest.raises(InvalidParameterError, match="weightlens.config.progress"):
        _progress.wanted(None)
    settings.progress = "auto"
    with pytest.raises(InvalidParameterError, match="'progress' parameter"):
        _progress.wanted("on")


def test_analyze_shows_a_bar_only_where_someone_watches(settings, monkeypatch, capsys, digits_zoo):
    tv = digits_zoo.task_vectors()
    wl.analyze(tv, device="cpu", keys=tv.keys[:2])
    assert "analyze" not in capsys.readouterr().err  # pytest is not a terminal
    settings.progress_delay = 0.0
    monkeypatch.setattr(_progress, "interactive", lambda: True)
    wl.analyze(tv, device="cpu", keys=tv.keys[:2])
    assert "analyze" in capsys.readouterr().err
    settings.progress = False
    wl.analyze(tv, device="cpu", keys=tv.keys[:2], progress=True)
    assert capsys.readouterr().err == ""


def test_weight_matching_that_converges_early_ends_its_bar_complete(capsys, digits_pairs):
    pair = digits_pairs[16]
    perms = rebasin.weight_matching(pair.a, pair.b, rebasin.mlp_spec(wl.load(pair.a)), progress=True)
    sweeps = len(perms.objective_history) - 1
    assert 1 <= sweeps < 100
    last = re.split(r"[\r\n]", capsys.readouterr().err.strip())[-1]
    assert f"{sweeps}/{sweeps}" in last and "/100" not in last
