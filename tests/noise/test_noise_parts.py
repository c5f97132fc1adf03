"""The seed stream, the statistics metric and the injector of noisy BatchNorm, without a Trainer."""

from __future__ import annotations

import pytest
import torch

from lightning_bn.noise import (
    RANK_STRIDE,
    SEED_BOUND,
    NoiseInjector,
    NoiseSample,
    NoiseSampler,
    NoiseSeedStream,
    NoiseStatistics,
    rank_seed,
)


# --- seed stream -------------------------------------------------------------------------------
def _old_formula(seed: int, steps: int, targets: int, rank: int) -> list[list[tuple[int, int]]]:
    """The callback's seeds as 0.1.0 wrote them inline (the reference the stream must reproduce)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        draws = torch.randint(0, 1 << 62, (targets, 2), generator=generator)
        out.append(
            [(int(u), (int(e) + rank * 0x9E3779B97F4A7C15) % (1 << 63)) for u, e in draws.tolist()]
        )
    return out


@pytest.mark.parametrize("rank", [0, 1, 7])
def test_stream_reproduces_the_seeds_the_callback_used_before(rank: int) -> None:
    stream = NoiseSeedStream(5)
    assert [stream.draw(3, rank) for _ in range(4)] == _old_formula(5, 4, 3, rank)
    assert (SEED_BOUND, RANK_STRIDE) == (1 << 62, 0x9E3779B97F4A7C15)


def test_stream_is_deterministic_distinct_per_step_and_rank() -> None:
    streams = [NoiseSeedStream(11) for _ in range(3)]
    runs = [[s.draw(4, rank=r) for _ in range(3)] for s, r in zip(streams, (0, 1, 0), strict=True)]
    assert runs[0] == runs[2]  # same seed, same rank: same seeds
    ranks = runs[:2]
    for step in range(3):
        units = [[u for u, _ in ranks[r][step]] for r in (0, 1)]
        entries = [[e for _, e in ranks[r][step]] for r in (0, 1)]
        assert units[0] == units[1]  # per-unit draws are shared by every rank
        assert set(entries[0]).isdisjoint(entries[1])  # per-entry draws are each rank's own
    every = [seed for step in runs[0] for pair in step for seed in pair]
    assert len(set(every)) == len(every)  # no repeat over steps and targets
    assert NoiseSeedStream(12).draw(4) != runs[0][0]
    # rank 0 keeps the drawn seed; the stride wraps modulo 2**63 into a valid seed
    assert rank_seed(123, 0) == 123
    assert rank_seed(SEED_BOUND - 1, 3) == (SEED_BOUND - 1 + 3 * RANK_STRIDE) % (1 << 63)
    assert 0 <= rank_seed(SEED_BOUND - 1, 10**6) < 1 << 63


def test_stream_state_round_trip_and_seeded_generators() -> None:
    a = NoiseSeedStream(3)
    a.draw(2)
    b = NoiseSeedStream(99)
    b.set_state(a.get_state())
    assert a.draw(5, 1) == b.draw(5, 1)
    unit, entry = a.generators((17, 23), torch.device("cpu"))
    assert torch.equal(torch.rand(4, generator=unit), torch.rand(4, generator=_gen(17)))
    assert torch.equal(torch.rand(4, generator=entry), torch.rand(4, generator=_gen(23)))
    again = a.generators((17, 23), torch.device("cpu"))
    assert again[0] is unit  # reused per device, re-seeded at each call
    assert torch.equal(torch.rand(4, generator=again[0]), torch.rand(4, generator=_gen(17)))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- statistics metric -------------------------------------------------------------------------
def _sample(clean: torch.Tensor, seed: int) -> NoiseSample:
    return NoiseSampler(0.5, 2.0, 0.2, 0.3)(clean, _gen(seed))


def _hand(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, (sum((v - mean) ** 2 for v in values) / n) ** 0.5


def test_statistics_against_a_hand_computation() -> None:
    clean = torch.tensor([[1.0, -2.0, 0.5], [3.0, 4.0, -1.5]])
    sample = _sample(clean, 0)
    stats = NoiseStatistics(2)
    stats.update(1, clean, sample)
    out = stats.compute()
    clean_mean, clean_std = _hand(clean.flatten().tolist())
    out_mean, out_std = _hand(sample.output.double().flatten().tolist())
    assert out["calls"].tolist() == [0.0, 1.0] and out["count"].tolist() == [0.0, 6.0]
    assert out["clean_mean"][1].item() == pytest.approx(clean_mean, rel=1e-12)
    assert out["clean_std"][1].item() == pytest.approx(clean_std, rel=1e-12)
    assert out["out_mean"][1].item() == pytest.approx(out_mean, rel=1e-6)
    assert out["out_std"][1].item() == pytest.approx(out_std, rel=1e-6)
    assert out["mu_mean"][1].item() == pytest.approx(sum(sample.mu.tolist()) / 3, rel=1e-6)
    assert out["sigma_mean"][1].item() == pytest.approx(sum(sample.sigma.tolist()) / 3, rel=1e-6)
    assert torch.isnan(out["clean_mean"][0])  # target 0 had no update
    metrics = NoiseStatistics.to_metrics(out, ["a", "b.c"])
    assert sorted(metrics) == sorted(
        f"noise/b.c/{k}"
        for k in ("mu_mean", "sigma_mean", "clean_mean", "clean_std", "out_mean", "out_std")
    )
    assert metrics["noise/b.c/clean_std"] == pytest.approx(clean_std, rel=1e-12)


def test_merged_states_equal_the_statistics_of_the_concatenated_data() -> None:
    torch.manual_seed(0)
    parts = [torch.randn(5, 4) * 3 + 1, torch.randn(9, 4, dtype=torch.float64) - 2]
    samples = [_sample(x, seed) for seed, x in enumerate(parts)]
    ranks = [NoiseStatistics(1) for _ in parts]
    for metric, x, sample in zip(ranks, parts, samples, strict=True):
        metric.update(0, x, sample)
    merged = ranks[0]
    merged.merge_state(ranks[1])  # the same "sum" reduction a DDP sync applies
    out = merged.compute()
    clean = torch.cat([x.double().flatten() for x in parts])
    noisy = torch.cat([s.output.double().flatten() for s in samples])
    assert out["count"].item() == clean.numel() and out["calls"].item() == 2
    assert out["clean_mean"].item() == pytest.approx(clean.mean().item(), rel=1e-12)
    assert out["clean_std"].item() == pytest.approx(clean.std(correction=0).item(), rel=1e-12)
    assert out["out_mean"].item() == pytest.approx(noisy.mean().item(), rel=1e-6)
    assert out["out_std"].item() == pytest.approx(noisy.std(correction=0).item(), rel=1e-6)
    # mu_mean averages the per-call means (each rank's draw counts once)
    expected_mu = sum(s.mu.double().mean().item() for s in samples) / 2
    assert out["mu_mean"].item() == pytest.approx(expected_mu, rel=1e-6)


def test_statistics_reset_and_bad_size() -> None:
    stats = NoiseStatistics(1)
    stats.update(0, torch.ones(2, 2), _sample(torch.ones(2, 2), 1))
    stats.reset()
    assert stats.count.tolist() == [0.0]
    with pytest.raises(ValueError, match=r"`num_targets` to be an integer >= 0, but got -1"):
        NoiseStatistics(-1)


# --- injector ----------------------------------------------------------------------------------
def test_injector_uses_the_stream_seeds_and_records_first_pass_only() -> None:
    sampler = NoiseSampler()
    targets = [("a", torch.nn.BatchNorm1d(3)), ("b", torch.nn.LayerNorm(2))]
    injector = NoiseInjector(sampler, NoiseSeedStream(4), targets, rank=1)
    assert injector.names == ["a", "b"] and injector.channels_last == [False, True]
    with pytest.raises(RuntimeError, match="call new_batch"):
        injector(0, torch.randn(3, 2))
    injector.new_batch(record=True)
    x = torch.randn(6, 3, 2)
    y = injector(1, x)
    # the reference: the sampler with generators seeded by the old formula
    (_, _), (unit_seed, entry_seed) = _old_formula(4, 1, 2, rank=1)[0]
    expected = sampler(x, _gen(unit_seed), channels_last=True, entry_generator=_gen(entry_seed))
    assert torch.equal(y, expected.output)
    assert torch.equal(injector(1, x), y)  # every pass of the batch: the same noise
    injector(1, x * 100)  # a later pass of the same batch is not recorded
    assert injector.recorded == {1}
    metrics = injector.metrics()
    assert metrics["noise/b/clean_mean"] == pytest.approx(x.double().mean().item(), rel=1e-12)
    assert "noise/a/clean_mean" not in metrics and injector.record is False
    injector.new_batch(record=False)
    assert not torch.equal(injector(1, x), y)  # the next batch: fresh noise
    assert injector.recorded == set()
