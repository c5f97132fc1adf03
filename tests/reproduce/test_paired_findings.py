"""The per-step findings (ICS, Fig. 4a-c): paired ratios decided on the early phase, with the
whole run and the matched-loss comparison beside, on hand-made histories."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lightning_bn.reproduce import VariantHistory, VariantSpec, build_plan, evaluate_findings
from lightning_bn.reproduce.findings import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, Finding
from lightning_bn.reproduce.history import RunData
from lightning_bn.reproduce.summary import findings_json, render_summary

KEY = "smoothness/beta_eff"
STEPS = list(range(0, 200, 10))  # 20 measured steps


def _plan():  # type: ignore[no-untyped-def]
    return build_plan("digits", archs=("mlp",), lrs=(0.1,), steps=200, seeds=3, measure_every=10)


def _hist(
    kind: str, seed: int, loss: list[float], beta: list[float], measured: list[float] | None = None
) -> VariantHistory:
    series = {
        "train/loss": (STEPS, loss),
        KEY: (STEPS, beta),
        "lipschitz/loss": (STEPS, measured if measured is not None else loss),
    }
    return VariantHistory.from_lists(VariantSpec("mlp", kind, 0.1), series, seed=seed)


def _finding(hists: list[VariantHistory], name: str = "beta_smoothness") -> tuple[RunData, Finding]:
    run = RunData.from_histories(_plan(), hists)
    return run, next(f for f in evaluate_findings(run, [name]) if f.id == f"{name}/mlp")


def _saturating_run(fit_at: int = 100) -> tuple[RunData, Finding]:
    """The standard network fits its data at step ``fit_at``: before it, BN's β_eff is half the
    standard network's; after it the standard network's gradient vanishes, so its β_eff drops
    to a tenth of BN's, for more measured steps than the early phase has."""
    hists = []
    for seed in range(3):
        std_loss = [2.0 * 0.9**i if s < fit_at else 0.005 for i, s in enumerate(STEPS)]
        bn_loss = [2.0 * 0.85**i for i, _ in enumerate(STEPS)]  # never below 0.02 here
        bn_beta = [1.0 + 0.01 * seed] * len(STEPS)
        std_beta = [2.0 if s < fit_at else 0.1 for s in STEPS]
        hists += [
            _hist("batchnorm", seed, bn_loss, bn_beta),
            _hist("standard", seed, std_loss, std_beta),
        ]
    return _finding(hists)


def test_post_fit_reversal_does_not_decide_the_verdict() -> None:
    _, f = _saturating_run(fit_at=50)
    # whole run: 5 steps at ratio ≈ 0.5, 15 at ≈ 10: the median says "not reproduced"
    assert f.whole_run is not None and f.whole_run.verdict == NOT_REPRODUCED
    assert f.whole_run.steps == ((20,), (20,), (20,))
    # the early phase (steps 0 … 40, before the standard network fitted at 50) decides
    assert f.phase is not None and f.phase.steps == ((5,), (5,), (5,))
    assert f.verdict == REPRODUCED
    assert f.median == pytest.approx(0.505)  # per seed 0.5, 0.505, 0.51: median 0.505
    assert f.per_seed == pytest.approx((0.5, 0.505, 0.51))
    assert f.fits == ((None, 50),) * 3
    assert "early phase" in f.decided_by


def test_an_early_phase_too_short_is_inconclusive() -> None:
    _, f = _saturating_run(fit_at=20)  # two measured steps (0, 10) before the fit: fewer than 3
    assert f.phase is not None and f.phase.steps == ((2,), (2,), (2,))
    assert f.verdict == INCONCLUSIVE and math.isnan(f.median)


def test_the_summary_names_the_fit_step_and_json_documents_the_comparisons() -> None:
    run, f = _saturating_run(fit_at=80)
    text = render_summary(run, [f])
    assert "the standard network fitted its training data at step 80 (seed 0)" in text
    data = json.loads(json.dumps(findings_json(run, [f])))
    row = data["findings"][0]
    assert row["phase"]["steps"] == [[8], [8], [8]]
    assert row["whole_run"]["steps"] == [[20], [20], [20]]
    assert row["fit_steps"][0] == {"batchnorm": None, "standard": 80}
    assert "moving blocks" in row["resampled"] and "1%" in data["phase_rule"]
    assert len(row["matched_loss"]["bins"]) == 3 and min(row["matched_loss"]["bins"]) >= 1


def test_no_fit_means_every_step_decides() -> None:
    hists = []
    for seed in range(3):
        loss = [2.0 - 0.05 * i for i in range(20)]
        hists += [
            _hist("batchnorm", seed, loss, [0.5] * 20),
            _hist("standard", seed, loss, [1.0] * 20),
        ]
    run, f = _finding(hists)
    assert f.phase is not None and f.phase.steps == ((20,),) * 3
    assert f.verdict == REPRODUCED and f.median == pytest.approx(0.5)
    assert "neither the standard network nor BatchNorm fitted" in render_summary(run, [f])


def test_matched_loss_bins_use_the_measured_batch_loss() -> None:
    # BN's loss falls from 2 to 0.2, the standard's stays in [1, 2): they share the bin
    # [1, 3.16) only. There BN's β_eff is 3 (its early, rough steps), the standard's 1.
    hists = []
    for seed in range(2):
        bn_loss = [2.0, 1.5, 1.2] + [0.2] * 17
        bn_beta = [3.0, 3.0, 3.0] + [0.1] * 17
        std_loss = [1.9 - 0.04 * i for i in range(20)]
        hists += [
            _hist("batchnorm", seed, bn_loss, bn_beta),
            _hist("standard", seed, std_loss, [1.0] * 20),
        ]
    _, f = _finding(hists)
    assert f.matched is not None
    assert f.matched.bins == (1, 1)
    assert f.matched.steps == ((3, 20), (3, 20))
    assert f.matched.median == pytest.approx(3.0) and f.matched.verdict == NOT_REPRODUCED
    # the same-step comparison sees BN far smoother on most steps
    assert f.verdict == REPRODUCED


def test_ics_ratio_is_the_median_over_layers_of_per_layer_ratios() -> None:
    layers = (
        "model.blocks.0.linear",
        "model.blocks.1.linear",
        "model.blocks.2.linear",
        "model.head",
    )
    hists = []
    for seed in range(2):
        for kind, per_layer in (
            ("batchnorm", (0.0, 1.0, 3.0, 8.0)),
            ("standard", (0.0, 2.0, 2.0, 2.0)),
        ):
            series = {"train/loss": (STEPS, [1.0] * 20)}
            for layer, value in zip(layers, per_layer, strict=True):
                series[f"ics/{layer}/l2"] = (STEPS, [value] * 20)
            hists.append(
                VariantHistory.from_lists(VariantSpec("mlp", kind, 0.1), series, seed=seed)
            )
    _, f = _finding(hists, "ics_not_smaller")
    # the first layer (0 in both) is left out; ratios 0.5, 1.5, 4: median 1.5
    assert f.median == pytest.approx(1.5) and f.verdict == REPRODUCED
    assert np.isclose(f.per_seed, 1.5).all()
