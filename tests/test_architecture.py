"""The layering of docs/architecture.md, checked: what each part may import, and the worked example."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.support.models import Classifier, MemoryLogger, Recorder, fit, mlp

SRC = Path(__file__).resolve().parents[1] / "src" / "lightning_bn"
ROOT = Path(__file__).resolve().parents[1]

#: The plain-torch layer: importable without Lightning or W&B.
PLAIN_TORCH = [
    "lightning_bn.layers",
    "lightning_bn.probe",
    "lightning_bn.batched",
    "lightning_bn.paramvec",
    "lightning_bn.selection",
    "lightning_bn.logger_extras",
    "lightning_bn.diagnostics.ics",
    "lightning_bn.diagnostics.landscape",
    "lightning_bn.diagnostics.hvp",
    "lightning_bn.diagnostics.eigen",
    "lightning_bn.diagnostics.curvature",
    "lightning_bn.diagnostics.bounds",
    "lightning_bn.diagnostics.noise",
    "lightning_bn.plotting",
]

# Importing a submodule runs lightning_bn/__init__ (which pulls in the callbacks), so the check
# replaces the top-level package by an empty one with the same path: each module and the
# subpackages it needs load from their files, as they would for a plain-torch user.
_PROBE = """
import importlib, sys, types
pkg = types.ModuleType("lightning_bn"); pkg.__path__ = [{src!r}]; sys.modules["lightning_bn"] = pkg
importlib.import_module({name!r})
bad = sorted(k for k in sys.modules if k.split(".")[0] in ("lightning", "pytorch_lightning", "wandb"))
print(",".join(bad))
"""


@pytest.mark.parametrize("name", PLAIN_TORCH)
def test_plain_torch_parts_import_neither_lightning_nor_wandb(name: str) -> None:
    code = _PROBE.format(src=str(SRC), name=name)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "", f"{name} imports {out.stdout.strip()}"


def test_callback_files_are_thin() -> None:
    for path in sorted((SRC / "callbacks").glob("*.py")):
        if path.name in ("__init__.py", "base.py"):  # the shared wiring, not a callback
            continue
        n = len(path.read_text().splitlines())
        assert n < 250, f"{path.name} has {n} lines"


def test_callback_base_does_not_import_wandb_code() -> None:
    imports = [
        line
        for line in (SRC / "callbacks" / "base.py").read_text().splitlines()
        if line.lstrip().startswith(("import ", "from "))
    ]
    assert imports and not any("wandb" in line for line in imports)


def _load_example() -> object:
    spec = importlib.util.spec_from_file_location(
        "new_diagnostic", ROOT / "examples" / "new_diagnostic.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_worked_example_matches_autograd_brute_force() -> None:
    """The doc's example callback logs ‖∇_{W_i} L‖ at W^t equal to a deep-copy autograd pass."""
    example = _load_example()
    recorder, logger = Recorder(), MemoryLogger()
    make = lambda: Classifier(mlp(dropout=0.3)).double()  # noqa: E731
    fit(make, [recorder, example.GradNormCallback(every_n_steps=2)], steps=5, logger=logger)
    measured = [s for s in recorder.steps if s["step"] % 2 == 0]
    assert [s["step"] for s in measured] == [0, 2, 4]
    for s in measured:
        ref = make()
        ref.load_state_dict(s["before"])
        ref.train()
        with torch.random.fork_rng():
            torch.set_rng_state(s["rng"])
            loss = nn.functional.cross_entropy(ref(s["batch"][0]), s["batch"][1])
        grads = torch.autograd.grad(loss, list(ref.parameters()))
        logged = logger.history[s["step"]]
        for (name, _), g in zip(ref.named_parameters(), grads, strict=True):
            assert logged[f"gradnorm/{name}"] == pytest.approx(float(g.norm()), rel=1e-9, abs=1e-12)
