"""Memory held flat: nothing a measurement allocates outlives it (issue 14)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_bn.diagnostics.landscape import compute_lipschitz
from lightning_bn.probe import Probe, RNGState, StepRecord
from tests.support.models import Classifier

ROOT = Path(__file__).resolve().parents[2]


def test_lipschitz_measurement_leaves_no_activation_alive() -> None:
    # The Theorem 4.1 capture hooks the normalisation layers' inputs and outputs; a hook closure
    # that holds the record holding the hooked tensor is a cycle through autograd that gc cannot
    # collect: the activation (and the probe's graph behind it) would stay alive for good.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    module = Classifier(net)
    module.train()
    probe = Probe(module)
    gen = torch.Generator().manual_seed(1)
    batch = (
        torch.randn(16, 8, generator=gen, dtype=torch.float64),
        torch.randint(0, 3, (16,), generator=gen),
    )
    seen: list[weakref.ref[Any]] = []

    def spy(mod: nn.Module, args: Any, output: Any) -> None:
        seen.extend([weakref.ref(args[0]), weakref.ref(output)])

    handle = net[1].register_forward_hook(spy)
    step = StepRecord(batch=batch, batch_idx=0, rng=RNGState.capture(), step=0)
    try:
        values = compute_lipschitz(probe, probe.parameters(), step, [0.1], [("net.1", net[1])])
    finally:
        handle.remove()
    assert "net.1/thm41_ratio" in values and 0 < values["net.1/thm41_ratio"] <= 1 + 1e-9
    gc.collect()
    # one gradient pass + one grid point: every activation the probes made is gone
    assert len(seen) == 4
    assert [r() for r in seen] == [None] * 4
    # and the layer holds no hook of the measurement
    assert not net[1]._forward_hooks


@pytest.mark.slow
def test_four_callbacks_every_step_keep_memory_flat() -> None:
    # two 300-step fits with ICS, Lipschitz, Smoothness and noise at every step, in a fresh
    # process: before the fix the Lipschitz capture alone kept about 60 MB per fit alive
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.soak", "300", "128"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    mb = json.loads(proc.stdout.strip().splitlines()[-1])
    assert mb["fit2"] - mb["fit1"] < 40, mb
