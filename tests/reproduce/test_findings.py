"""Verdicts, bootstrap intervals and findings of `lightning-bn reproduce`, on hand-made statistics.

No training here: the verdict rule is checked on intervals placed on either side of a threshold,
straddling it or undefined; the bootstrap on cases whose interval is known in closed form; each
finding on hand-made per-seed histories whose statistic is computed by hand.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from lightning_bn.reproduce import VariantHistory, VariantSpec, build_plan, evaluate_findings
from lightning_bn.reproduce.findings import (
    CRITERIA,
    FINDINGS,
    INCONCLUSIVE,
    NOT_EVALUATED,
    NOT_REPRODUCED,
    REPRODUCED,
    Finding,
    bootstrap,
    verdict,
)
from lightning_bn.reproduce.history import HI, LO, RunData, seed_median
from lightning_bn.reproduce.plan import ExperimentPlan

STEPS = [0, 10, 20, 30, 40, 50, 60, 70]
LAYERS = ("model.blocks.0.linear", "model.blocks.1.linear", "model.head")


# --- the verdict rule ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("interval", "side", "expected"),
    [
        ((0.2, 0.8), "below", REPRODUCED),  # entirely on the paper's side
        ((1.2, 3.0), "below", NOT_REPRODUCED),  # entirely on the other side
        ((1.0, 3.0), "below", NOT_REPRODUCED),  # touching the threshold is not the paper's side
        ((0.5, 1.5), "below", INCONCLUSIVE),  # straddling
        ((0.2, 1.0), "below", INCONCLUSIVE),  # reaching the threshold from the paper's side
        ((1.2, 3.0), "above", REPRODUCED),
        ((0.2, 0.8), "above", NOT_REPRODUCED),
        ((0.2, 1.0), "above", NOT_REPRODUCED),
        ((0.9, 1.1), "above", INCONCLUSIVE),
        ((math.nan, math.nan), "below", INCONCLUSIVE),  # a diverged run's undefined statistic
        ((0.2, math.nan), "above", INCONCLUSIVE),
        ((1.5, math.inf), "above", REPRODUCED),  # a standard run that diverged: ratio ∞
        ((1.5, math.inf), "below", NOT_REPRODUCED),
    ],
)
def test_verdict(interval: tuple[float, float], side: str, expected: str) -> None:
    assert verdict(interval, 1.0, side) == expected


def test_verdict_rejects_unknown_side() -> None:
    with pytest.raises(ValueError, match="'below' or 'above'"):
        verdict((0.0, 1.0), 0.5, "left")


def test_criteria_are_fixed_in_one_table() -> None:
    # every finding's rule comes from CRITERIA, with a side and a finite threshold
    names = {f.name for f in evaluate_findings(_run(_plan()))}
    assert names == set(CRITERIA) == set(FINDINGS)
    with pytest.raises(ValueError, match="finding names"):
        evaluate_findings(_run(_plan()), ["no_such_finding"])
    for crit in CRITERIA.values():
        assert crit.side in ("below", "above") and math.isfinite(crit.threshold)
        assert f"{crit.threshold:g}" in crit.rule()


# --- the bootstrap -------------------------------------------------------------------------------------
def _constant(value: float):  # type: ignore[no-untyped-def]
    return lambda rng: value


def test_bootstrap_two_constant_seeds_spans_them() -> None:
    # Replicates are a (prob 1/4), (a + b)/2 (1/2) or b (1/4): the 2.5% and 97.5% order
    # statistics are a and b, the median over seeds is their mean.
    median, (lo, hi), points = bootstrap([_constant(1.0), _constant(3.0)], samples=2000)
    assert (median, lo, hi, points) == (2.0, 1.0, 3.0, [1.0, 3.0])


def test_bootstrap_one_seed_without_redraw_is_a_point() -> None:
    assert bootstrap([_constant(0.7)], samples=50)[:2] == (0.7, (0.7, 0.7))


def test_bootstrap_mean_of_normal_sample_matches_closed_form() -> None:
    # One seed whose statistic is the mean of n values: the percentile bootstrap interval of a
    # mean is mean ± 1.96 s / sqrt(n) up to O(1/sqrt(samples)) noise.
    data = np.random.default_rng(1).normal(5.0, 2.0, size=400)

    def stat(rng: np.random.Generator | None) -> float:
        return float((data if rng is None else data[rng.integers(0, data.size, data.size)]).mean())

    median, (lo, hi), _ = bootstrap([stat], samples=4000, seed=3)
    half = 1.96 * data.std() / math.sqrt(data.size)
    assert median == pytest.approx(data.mean())
    assert lo == pytest.approx(data.mean() - half, abs=0.12 * half)
    assert hi == pytest.approx(data.mean() + half, abs=0.12 * half)


def test_bootstrap_nan_and_inf() -> None:
    median, interval, _ = bootstrap([_constant(1.0), _constant(math.nan)], samples=100)
    assert math.isnan(median) and all(math.isnan(v) for v in interval)
    median, (lo, hi), _ = bootstrap([_constant(2.0), _constant(math.inf)], samples=400)
    assert median == math.inf and lo == 2.0 and hi == math.inf


def test_bootstrap_is_deterministic_and_checks_arguments() -> None:
    data = np.arange(10.0)

    def stat(rng: np.random.Generator | None) -> float:
        return float((data if rng is None else data[rng.integers(0, 10, 10)]).mean())

    assert bootstrap([stat], samples=100, seed=5) == bootstrap([stat], samples=100, seed=5)
    with pytest.raises(ValueError, match="at least one"):
        bootstrap([])
    with pytest.raises(ValueError, match="samples"):
        bootstrap([stat], samples=0)


# --- hand-made runs ------------------------------------------------------------------------------------
def _plan(
    experiment: str = "digits", archs: tuple[str, ...] = ("mlp",), seeds: int = 2
) -> ExperimentPlan:
    lrs = (1e-6,) if experiment == "dln" else (0.1, 1.0)
    return build_plan(experiment, archs=archs, lrs=lrs, steps=80, seeds=seeds, measure_every=10)


def _hist(
    kind: str,
    seed: int,
    lr: float = 0.1,
    *,
    arch: str = "mlp",
    scale: float = 1.0,
    batch: int | None = None,
    series: Mapping[str, Sequence[float]] | None = None,
    final: Mapping[str, float] | None = None,
) -> VariantHistory:
    """A run whose diagnostics take the given values at ``STEPS``, and ``final/*`` at step 80."""
    data: dict[str, tuple[list[int], list[float]]] = {}
    for key, values in (series or {}).items():
        if key == "ics":
            for i, layer in enumerate(LAYERS):
                # The first layer's shift is 0 by definition; it must not count.
                data[f"ics/{layer}/l2"] = (STEPS, [0.0] * len(STEPS) if i == 0 else list(values))
        else:
            data[key] = (STEPS, list(values))
    for key, value in (final or {}).items():
        data[f"final/{key}"] = ([80], [value])
    spec = VariantSpec(arch, kind, lr, scale, batch)
    return VariantHistory.from_lists(spec, data, seed=seed)


def _run(plan: ExperimentPlan, *histories: VariantHistory) -> RunData:
    return RunData.from_histories(plan, histories)


def _by_name(run: RunData, name: str, arch: str = "mlp") -> Finding:
    return next(f for f in evaluate_findings(run, [name]) if f.id == f"{name}/{arch}")


def _landscape_run(bn: Sequence[Sequence[float]], std: Sequence[Sequence[float]]) -> RunData:
    key = "smoothness/beta_eff"
    hists = [_hist("batchnorm", s, series={key: v}) for s, v in enumerate(bn)]
    hists += [_hist("standard", s, series={key: v}) for s, v in enumerate(std)]
    return _run(_plan(), *hists)


def test_landscape_ratio_verdicts() -> None:
    std = [[1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 1.0]] * 2
    smaller = _landscape_run([[0.5, 0.45, 0.55, 0.5, 0.5, 0.52, 0.48, 0.5]] * 2, std)
    f = _by_name(smaller, "beta_smoothness")
    assert f.verdict == REPRODUCED
    assert f.median == pytest.approx(0.5 / 1.0)
    larger = _landscape_run([[2.0, 2.1, 1.9, 2.0, 2.0, 2.2, 1.8, 2.0]] * 2, std)
    assert _by_name(larger, "beta_smoothness").verdict == NOT_REPRODUCED
    # the seeds disagree: one at 0.5, one at 2: the interval straddles 1
    mixed = _landscape_run([[0.5] * 8, [2.0] * 8], [[1.0] * 8, [1.0] * 8])
    f = _by_name(mixed, "beta_smoothness")
    assert f.verdict == INCONCLUSIVE
    assert f.per_seed == (0.5, 2.0)
    assert f.interval == (0.5, 2.0)


def test_landscape_with_a_diverged_run_is_inconclusive() -> None:
    # a diverged BN run measured nothing finite: its statistic is NaN, the finding inconclusive
    run = _landscape_run([[math.nan] * 8, [0.5] * 8], [[1.0] * 8, [1.0] * 8])
    f = _by_name(run, "beta_smoothness")
    assert f.verdict == INCONCLUSIVE
    assert math.isnan(f.per_seed[0])


def test_ics_pools_layers_but_the_first() -> None:
    hists = [_hist("batchnorm", s, series={"ics": [2.0] * 8}) for s in (0, 1)] + [
        _hist("standard", s, series={"ics": [1.0] * 8}) for s in (0, 1)
    ]
    f = _by_name(_run(_plan(), *hists), "ics_not_smaller")
    # with the first layer (0 everywhere) pooled the medians would both be smaller
    assert f.median == pytest.approx(2.0)
    assert f.verdict == REPRODUCED


def test_ics_dln_threshold_is_strictly_larger() -> None:
    plan = _plan("dln", archs=("dln",))
    hists = [
        _hist(k, s, 1e-6, arch="dln", series={"ics": [1.0] * 8})
        for k in ("batchnorm", "standard")
        for s in (0, 1)
    ]
    f = _by_name(_run(plan, *hists), "ics_not_smaller", "dln")
    assert f.threshold == 1.0 and "larger" in f.title
    assert f.verdict == NOT_REPRODUCED


def _acc(kind: str, seed: int, acc: float, **kw: object) -> VariantHistory:
    return _hist(kind, seed, final={"val_acc": acc, "val_samples": 360.0}, **kw)  # type: ignore[arg-type]


def test_small_batch_difference_of_differences() -> None:
    hists = []
    for s in (0, 1):
        hists += [
            _acc("batchnorm", s, 0.96),
            _acc("batchnorm", s, 0.60, batch=4),
            _acc("layernorm", s, 0.96),
            _acc("layernorm", s, 0.90, batch=4),
        ]
    f = _by_name(_run(_plan(), *hists), "small_batch")
    assert f.median == pytest.approx((0.96 - 0.60) - (0.96 - 0.90))
    assert f.verdict == REPRODUCED
    lo, hi = f.interval
    assert lo < 0.30 < hi  # the binomial redraw over 360 validation samples widens it


def test_small_batch_equal_losses_is_not_a_reproduction() -> None:
    hists = []
    for s in (0, 1):
        hists += [
            _acc("batchnorm", s, 0.96),
            _acc("batchnorm", s, 0.90, batch=4),
            _acc("layernorm", s, 0.96),
            _acc("layernorm", s, 0.90, batch=4),
        ]
    f = _by_name(_run(_plan(), *hists), "small_batch")
    assert f.median == pytest.approx(0.0, abs=1e-12)
    assert f.verdict == INCONCLUSIVE


def test_init_sensitivity() -> None:
    hists = []
    for s in (0, 1):
        hists += [
            _acc("batchnorm", s, 0.96),
            _acc("batchnorm", s, 0.95, scale=0.25),
            _acc("batchnorm", s, 0.92, scale=4.0),
            _acc("standard", s, 0.95),
            _acc("standard", s, 0.10, scale=0.25),
            _acc("standard", s, 0.10, scale=4.0),
        ]
    f = _by_name(_run(_plan(), *hists), "init_sensitivity")
    assert f.median == pytest.approx(0.04 - 0.85)
    assert f.verdict == REPRODUCED


@pytest.mark.parametrize(
    ("changes", "reasons"),
    [
        ({"task": "regression"}, ("no accuracy in a regression task",) * 2),
        (
            {"init_scales": (), "small_batches": ()},
            ("no scaled-initialisation runs in this plan", "no small-batch runs in this plan"),
        ),
        (  # the extra variants go on another architecture
            {"extra_archs": ("cnn",)},
            ("no scaled-initialisation runs in this plan", "no small-batch runs in this plan"),
        ),
    ],
)
def test_extra_variant_claims_say_why_they_are_not_evaluated(
    changes: dict[str, object], reasons: tuple[str, str]
) -> None:
    run = _run(dataclasses.replace(_plan(), **changes))  # type: ignore[arg-type]
    found = [_by_name(run, name) for name in ("init_sensitivity", "small_batch")]
    assert [f.verdict for f in found] == [NOT_EVALUATED] * 2
    assert tuple(f.numbers for f in found) == reasons


def test_steps_to_accuracy_ratio() -> None:
    def curve(kind: str, seed: int, accs: Sequence[float], final: float) -> VariantHistory:
        return _hist(kind, seed, series={"val/acc": accs}, final={"val_acc": final, "steps": 80.0})

    hists = []
    for s in (0, 1):
        hists.append(curve("batchnorm", s, [0.3, 0.8, 0.95, 0.97, 0.97, 0.97, 0.97, 0.97], 0.97))
        hists.append(curve("standard", s, [0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.93, 0.94], 0.95))
    f = _by_name(_run(_plan(), *hists), "steps_to_accuracy")
    # target 0.95: BN first reaches it at step 20, the standard network only at the end (80)
    assert f.median == pytest.approx(20 / 80)
    assert f.verdict == REPRODUCED
    never = [curve("batchnorm", s, [0.5] * 8, 0.5) for s in (0, 1)] + hists[1::2]
    f = _by_name(_run(_plan(), *never), "steps_to_accuracy")
    assert f.median == math.inf and f.verdict == NOT_REPRODUCED


def test_trains_faster_diverged_standard() -> None:
    hists = []
    for s in (0, 1):
        hists.append(_hist("batchnorm", s, series={"train/loss": [1.0, 0.5] * 4}))
        hists.append(
            _hist("standard", s, series={"train/loss": [2.0] * 8}, final={"diverged": 1.0})
        )
    f = _by_name(_run(_plan(), *hists), "bn_trains_faster")
    assert f.median == 0.0 and f.verdict == REPRODUCED


def test_missing_runs_are_not_evaluated() -> None:
    findings = evaluate_findings(_run(_plan()))
    assert len(findings) == len(FINDINGS)
    assert all(f.verdict == NOT_EVALUATED for f in findings)
    assert all(f.numbers for f in findings)  # the reason


def test_seed_median_bands() -> None:
    spec = VariantSpec("mlp", "batchnorm", 0.1)
    a = VariantHistory.from_lists(spec, {"x": ([0, 1, 2], [1.0, 2.0, 3.0]), "f": ([9], [1.0])}, 0)
    b = VariantHistory.from_lists(spec, {"x": ([0, 1], [3.0, 4.0]), "f": ([7], [3.0])}, 1)
    c = VariantHistory.from_lists(spec, {"x": ([0, 1], [2.0, 9.0]), "f": ([9], [5.0])}, 2)
    m = seed_median([a, b, c])
    assert m.seed is None
    assert m.get("x")[0].tolist() == [0, 1]  # steps every seed logged
    assert m.get("x")[1].tolist() == [2.0, 4.0]
    assert m.get("x" + LO)[1].tolist() == [1.0, 2.0]
    assert m.get("x" + HI)[1].tolist() == [3.0, 9.0]
    # a key logged once per run (final/*) is aligned by position, at the latest step
    assert m.get("f")[0].tolist() == [9] and m.get("f")[1].tolist() == [3.0]
