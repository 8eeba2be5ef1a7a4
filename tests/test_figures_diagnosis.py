"""``weightlens.figures.diagnosis`` and the report's Diagnosis section: the bars are the diagnosis' own ranking.

The digits zoo's planted conflict (``rot90_swap``, trained against ``rot90``'s labels in ``fc2``) merged by
task arithmetic at alpha 0.5: fc2 ranks first for rot90 and rot90_swap opposes it there
(``tests/test_diagnosis.py``); the figure must draw exactly that. The report section is checked on small
random task vectors (its content is the diagnosis' summary and tables, whatever the weights).
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import torch

import weightlens as wl
from weightlens.analysis import analyze
from weightlens.diagnosis import Suggestion, diagnose
from weightlens.figures import figure_block_costs
from weightlens.figures.diagnosis import WORST_COLUMNS, culprit, diagnosis_section, worst_blocks


@pytest.fixture(scope="module")
def planted():
    from weightlens import zoo

    tv = zoo.load("digits-tasks", size="ci", planted=True).task_vectors()
    return tv, diagnose(tv, wl.merge(tv, method="task_arithmetic", alpha=0.5), progress=False)


def test_the_bars_are_the_ranking_and_name_who_opposes(planted):
    _, d = planted
    for task in d.tasks["task"]:
        ranking = d.ranking(task)
        fig = figure_block_costs(d, task)
        assert len(fig.data) == 1 and fig.data[0].name == "predicted cost"  # nothing measured: no overlay
        assert list(fig.data[0].x) == ranking["block"].tolist()
        np.testing.assert_array_equal(fig.data[0].y, ranking["predicted_cost"].to_numpy())
        assert list(fig.layout.xaxis.categoryarray) == ranking["block"].tolist()
    fig = figure_block_costs(d, "rot90")
    assert fig.data[0].x[0] == "fc2" and fig.data[0].text[0] == "opposed by rot90_swap"
    assert "opposed by rot90_swap (cancels 94%)" in fig.data[0].hovertext[0]
    assert "signs won by rot90_swap" in fig.data[0].hovertext[0] and "crowded by" in fig.data[0].hovertext[0]
    assert list(figure_block_costs(d, "rot90", top=1).data[0].x) == ["fc2"]
    with pytest.raises(wl.InvalidParameterError, match="'top' parameter of figure_block_costs"):
        figure_block_costs(d, "rot90", top=0)
    with pytest.raises(wl.InvalidParameterError, match="no task 'nope'"):
        figure_block_costs(d, "nope")


def test_the_measured_gain_is_overlaid_where_measured(planted):
    _, d = planted
    blocks = d.blocks.copy()
    at = (blocks["task"] == "rot90") & (blocks["block"] == "fc2")
    blocks.loc[at, ["measured_gain", "cost_to_others"]] = [0.362, 0.057]
    measured = {"split": "test", "metric": "accuracy", "evaluations": 6, "merged_scores": {}, "notes": []}
    fig = figure_block_costs(dataclasses.replace(d, blocks=blocks, measured=measured), "rot90")
    gain = fig.data[1]
    assert gain.name == "measured gain (accuracy on test)" and gain.yaxis == "y2"
    assert list(gain.x) == ["fc2"] and list(gain.y) == [0.362]  # fc1 was not tested: no mark
    assert fig.layout.yaxis2.overlaying == "y" and "measured gain +0.3620" in gain.hovertext[0]


def test_worst_blocks_and_culprit(planted):
    _, d = planted
    table = worst_blocks(d)
    assert list(table.columns) == WORST_COLUMNS and set(table["task"]) == set(d.tasks["task"])
    costliest = d.tasks.sort_values("predicted_cost", ascending=False)["task"].tolist()
    assert table["task"].tolist() == costliest and (table["block"] == "fc2").all()  # fc2: every task's worst
    assert (table["predicted_cost"].to_numpy() == [d.ranking(t).iloc[0]["predicted_cost"] for t in table["task"]]).all()
    row = {"opposed_by": "b", "opposition": 0.01, "crowded_by": "c"}
    assert culprit(row) == "crowded by c"  # an opposition under OPPOSED (5%) is not named
    assert culprit({**row, "opposition": 0.5}) == "opposed by b"
    from weightlens.diagnosis._result import OPPOSED
    from weightlens.figures.diagnosis import OPPOSED as FIGURE_OPPOSED

    assert FIGURE_OPPOSED == OPPOSED  # the figure names who opposes by the summary's rule
    assert culprit({"opposed_by": None, "opposition": 0.0, "crowded_by": math.nan}) == ""


def _small_tv() -> wl.TaskVectors:
    g = torch.Generator().manual_seed(0)
    shapes = {"enc.layer.0.fc.weight": (16, 12), "enc.layer.0.fc.bias": (16,), "enc.layer.1.fc.weight": (16, 12),
              "head.weight": (6, 16)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    return wl.TaskVectors(base, {t: {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
                                 for t in ("a", "b", "c")})


def test_the_report_has_a_diagnosis_section(tmp_path):
    tv = _small_tv()
    report = analyze(tv, device="cpu", progress=False)
    d = diagnose(tv, wl.merge(tv, method="task_arithmetic", alpha=0.5), progress=False)
    s = Suggestion(method="ties", alpha=0.8, params={"density": 0.3}, worst_task="a", worst=0.9, mean=0.95,
                   report_worst=math.nan, report_mean=math.nan, select_on="val", report_on="test")
    text = report.to_html(tmp_path / "r.html", diagnosis=dataclasses.replace(d, suggestion=s)).read_text()
    section = text[text.index("<h2>Diagnosis</h2>"):text.index("<h2>Per block</h2>")]
    for line in d.summary().splitlines():
        assert line.replace("'", "&#x27;") in section
    assert "Suggested: ties at alpha=0.8" in section and "Each task's worst block" in section
    worst = worst_blocks(d)
    rows = re.findall(r"<tr>\s*<td>(\w+)</td>\s*<td>([\w.]+)</td>", section)  # the table's first two cells
    assert rows == list(zip(worst["task"], worst["block"])) and len(rows) == len(d.tasks)
    assert text.count("Plotly.newPlot") == len(report.figures()) + len(d.tasks)  # one figure per task
    assert len(re.findall(r"plotly\.js v\d", text)) == 1  # still inlined once
    assert "<h2>Diagnosis</h2>" not in report.to_html(tmp_path / "plain.html").read_text()
    alone = diagnosis_section(d, include_plotlyjs=True)  # a page of its own carries plotly.js
    assert len(re.findall(r"plotly\.js v\d", alone)) == 1 and alone.count("Plotly.newPlot") == len(d.tasks)
    assert "Plotly.newPlot" not in diagnosis_section(d, figures=False)
