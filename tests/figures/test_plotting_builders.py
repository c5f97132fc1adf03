"""The generic figure builders of `lightning_bn.figures.draw`: one line or band per run, no reproduce."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from matplotlib.collections import PolyCollection

from lightning_bn.figures.draw import (
    RunHistory,
    band_figure,
    ics_figure,
    line_figure,
    panel_figure,
)
from lightning_bn.logging.extras import MetricHistory

STEPS = [0, 5, 10]


def _runs() -> list[RunHistory]:
    bn = RunHistory.from_lists(
        "BatchNorm",
        {
            "lipschitz/loss_min": (STEPS, [1.0, 0.8, 0.5]),
            "lipschitz/loss_max": (STEPS, [1.2, 0.9, 0.6]),
            "smoothness/beta_eff": (STEPS, [3.0, 2.0, 1.0]),
            "ics/net.1/l2": (STEPS, [0.1, 0.2, 0.3]),
            "ics/net.1/cos": (STEPS, [0.9, 0.8, 0.7]),
        },
        color="tab:blue",
    )
    history = MetricHistory()  # the other run as a callback recorded it
    rows = zip(STEPS, [2.0, 1.5, 1.0], [4.0, 3.0, 2.5], [9.0, 8.0, 7.0], strict=True)
    for step, lo, hi, beta in rows:
        history.add(
            step,
            {"lipschitz/loss_min": lo, "lipschitz/loss_max": hi, "smoothness/beta_eff": beta},
        )
    history.add(5, {"ics/net.1/l2": 0.5, "ics/net.3/l2": 0.25})
    plain = RunHistory.from_metric_history("standard", history, linestyle="--")
    return [bn, plain]


def test_band_figure_draws_one_band_per_run_with_its_values() -> None:
    bn, plain = _runs()
    fig = band_figure(
        [("lr = 0.1", [bn, plain]), ("alone", [plain])],
        "lipschitz/loss_min",
        "lipschitz/loss_max",
        "loss",
        "Fig. 4a",
    )
    assert fig is not None and fig.get_suptitle() == "Fig. 4a"
    first, second = fig.axes
    assert first.get_title() == "lr = 0.1" and second.get_title() == "alone"
    bands = [c for c in first.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2 and len([c for c in second.collections]) == 1
    assert [t.get_text() for t in first.get_legend().get_texts()] == ["BatchNorm", "standard"]
    # each band's outline runs through the run's min and max values
    lines = first.get_lines()
    np.testing.assert_array_equal(lines[0].get_ydata(), [1.0, 0.8, 0.5])
    np.testing.assert_array_equal(lines[1].get_ydata(), [1.2, 0.9, 0.6])
    np.testing.assert_array_equal(lines[3].get_ydata(), [4.0, 3.0, 2.5])
    assert lines[0].get_color() == "tab:blue"


def test_line_figure_one_line_per_run_and_none_without_data() -> None:
    bn, plain = _runs()
    fig = line_figure([("lr", [bn, plain])], "smoothness/beta_eff", "β", "Fig. 4c")
    assert fig is not None
    (ax,) = fig.axes
    got = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert got == {"BatchNorm": [3.0, 2.0, 1.0], "standard": [9.0, 8.0, 7.0]}
    assert [line.get_linestyle() for line in ax.get_lines()] == ["-", "--"]
    assert panel_figure([("lr", [bn])], lambda ax, run: False, "y", "t") is None
    assert line_figure([("lr", [bn])], "no/such_key", "y", "t") is None


def test_ics_figure_rows_per_layer_lines_per_run() -> None:
    bn, plain = _runs()
    assert bn.layers("ics/", "/l2") == ["net.1"] and plain.layers("ics/", "/l2") == [
        "net.1",
        "net.3",
    ]
    fig = ics_figure([bn, plain], ["net.1", "net.3"], "ICS")
    assert fig is not None and len(fig.axes) == 4  # two layers × (ℓ2, cos)
    l2_first, cos_first, l2_second, _ = fig.axes
    assert [line.get_label() for line in l2_first.get_lines()] == ["BatchNorm", "standard"]
    assert [list(line.get_ydata()) for line in l2_first.get_lines()] == [[0.1, 0.2, 0.3], [0.5]]
    assert [line.get_label() for line in cos_first.get_lines()] == ["BatchNorm"]
    # a layer only one run has is drawn for that run
    assert [line.get_label() for line in l2_second.get_lines()] == ["standard"]
    assert ics_figure([bn], [], "none") is None


def test_plotting_imports_neither_reproduce_nor_the_cli() -> None:
    code = (
        "import sys, lightning_bn.figures.draw; "
        "print(sorted(m for m in sys.modules if m.startswith(('lightning_bn.reproduce', "
        "'lightning_bn.cli'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"
