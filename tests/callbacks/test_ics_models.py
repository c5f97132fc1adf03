"""ICS on models whose layers are not plain ``Linear``/``Conv`` calls: attention, functional
weights, tied weights, Hugging Face transformers. Every value is checked against Def. 2.1
computed by hand (torch.nn modules, autograd, a hand-written order of parameter use)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn.callbacks.ics import ICSCallback
from tests.support.models import MemoryLogger, trainer

#: A hand-written order of first use: (layer name or None for parameters not measured, params).
Groups = list[tuple[str | None, list[str]]]


class Task(pl.LightningModule):
    """Cross-entropy of ``net(*inputs)`` against the last batch element, SGD with momentum."""

    def __init__(self, net: nn.Module, lr: float = 0.05) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        *inputs, y = batch
        logits = self.net(*inputs)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class AttnNet(nn.Module):
    """Linear → MultiheadAttention → ReLU → mean over positions → Linear (3 classes)."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(6, 8)
        self.attn = nn.MultiheadAttention(8, 2, dropout=0.1, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        a = torch.relu(self.attn(h, h, h, need_weights=False)[0])
        return self.head(a.mean(dim=1 if self.batch_first else 0))


ATTN_GROUPS: Groups = [
    ("net.inp", ["net.inp.weight", "net.inp.bias"]),
    ("net.attn", ["net.attn.in_proj_weight", "net.attn.in_proj_bias"]),
    ("net.attn.out_proj", ["net.attn.out_proj.weight", "net.attn.out_proj.bias"]),
    ("net.head", ["net.head.weight", "net.head.bias"]),
]


class EncoderNet(nn.Module):
    """Linear → TransformerEncoderLayer (post-norm, dropout) → mean → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(self.inp(x)).mean(dim=1))


def _p(prefix: str, *names: str) -> list[str]:
    return [f"{prefix}.{n}" for n in names]


ENCODER_GROUPS: Groups = [
    ("net.inp", _p("net.inp", "weight", "bias")),
    ("net.layer.self_attn", _p("net.layer.self_attn", "in_proj_weight", "in_proj_bias")),
    ("net.layer.self_attn.out_proj", _p("net.layer.self_attn.out_proj", "weight", "bias")),
    (None, _p("net.layer.norm1", "weight", "bias")),
    ("net.layer.linear1", _p("net.layer.linear1", "weight", "bias")),
    ("net.layer.linear2", _p("net.layer.linear2", "weight", "bias")),
    (None, _p("net.layer.norm2", "weight", "bias")),
    ("net.head", _p("net.head", "weight", "bias")),
]


class MatmulLayer(nn.Module):
    """A custom layer that uses its weight functionally: ``x @ W.T + b``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin) / cin**0.5)
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.T + self.bias


class FunctionalNet(nn.Module):
    """A custom matmul layer, a BatchNorm, and a parent that uses its child Linear's weight
    without calling the child (as MultiheadAttention does with ``out_proj``)."""

    def __init__(self) -> None:
        super().__init__()
        self.custom = MatmulLayer(8, 12)
        self.bn = nn.BatchNorm1d(12)
        self.proj = nn.Linear(12, 12)
        self.head = MatmulLayer(12, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn(self.custom(x)))
        h = torch.tanh(nn.functional.linear(h, self.proj.weight, self.proj.bias) * 0.5)
        return self.head(h)


FUNCTIONAL_GROUPS: Groups = [
    ("net.custom", _p("net.custom", "weight", "bias")),
    (None, _p("net.bn", "weight", "bias")),
    ("net.proj", _p("net.proj", "weight", "bias")),
    ("net.head", _p("net.head", "weight", "bias")),
]


class TiedNet(nn.Module):
    """A side input through ``gate``, token embeddings, a Linear, and an output layer whose
    weight is the embedding's (tied): logits for every position."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(4, 8)
        self.emb = nn.Embedding(10, 8)
        self.mid = nn.Linear(8, 8)
        self.out = nn.Linear(8, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens: Tensor, side: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate(side)).unsqueeze(1)  # (N, 1, 8), used before the embedding
        h = torch.tanh(self.mid(self.emb(tokens) * g))
        return self.out(h)


TIED_GROUPS: Groups = [
    ("net.gate", _p("net.gate", "weight", "bias")),
    ("net.mid", _p("net.mid", "weight", "bias")),
    # the embedding's weight is also the output weight: measured once, at the output layer (its
    # last holder and last use), with every other layer's parameters before it moved
    ("net.out", ["net.emb.weight"]),
]


def _data(kind: str, n: int = 32, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    if kind == "tied":
        tokens = torch.randint(0, 10, (n, 5), generator=gen)
        side = torch.randn(n, 4, generator=gen, dtype=torch.float64)
        return TensorDataset(tokens, side, torch.randint(0, 10, (n, 5), generator=gen))
    x = torch.randn(n, 5, 6, generator=gen, dtype=torch.float64)
    if kind == "functional":
        x = torch.randn(n, 8, generator=gen, dtype=torch.float64)
    return TensorDataset(x, torch.randint(0, 3, (n,), generator=gen))


class StateRecorder(pl.Callback):
    """Weights before and after each step, the RNG state and a copy of the batch."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        self.steps.append(
            {
                "step": trainer.global_step,
                "before": copy.deepcopy(pl_module.state_dict()),
                "rng": torch.get_rng_state(),
                "batch": [t.clone() for t in batch],
            }
        )

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, out: Any, batch: Any, i: int
    ) -> None:
        self.steps[-1]["after"] = copy.deepcopy(pl_module.state_dict())


def _units(x: Tensor) -> np.ndarray:
    return x.reshape(-1, x.shape[-1]).T.numpy()  # features in the last dimension


def brute_force_ics(
    make: Callable[[], Task], groups: Groups, record: dict[str, Any], inputs_of: dict[str, str]
) -> dict[str, float]:
    """Def. 2.1 with torch.nn modules: for layer i, every parameter of the groups before it in
    the hand-written order is loaded from W^{t+1}; inputs by forward pre-hooks on the modules
    named in ``inputs_of`` (layer name -> module path)."""
    params_of = dict((g, ps) for g, ps in groups if g is not None)

    def run(earlier: list[str]) -> tuple[Tensor, Task, dict[str, Tensor]]:
        task = make()
        task.load_state_dict(record["before"])
        with torch.no_grad():
            for name in earlier:
                task.get_parameter(name).copy_(record["after"][name])
        captured: dict[str, Tensor] = {}

        def keep(layer: str) -> Callable[[nn.Module, Any], None]:
            def hook(module: nn.Module, args: Any) -> None:
                captured.setdefault(layer, args[0].detach().clone())

            return hook

        for layer, path in inputs_of.items():
            task.get_submodule(path).register_forward_pre_hook(keep(layer))
        torch.set_rng_state(record["rng"])
        return task.training_step(record["batch"], 0), task, captured

    loss0, task0, inputs0 = run([])
    expected: dict[str, float] = {}
    for index, (layer, names) in enumerate(groups):
        if layer is None:
            continue
        g = torch.cat(
            [
                t.reshape(-1)
                for t in torch.autograd.grad(
                    loss0, [task0.get_parameter(n) for n in names], retain_graph=True
                )
            ]
        )
        earlier = [n for _, ps in groups[:index] for n in ps]
        loss1, task1, inputs1 = run(earlier)
        gp = torch.cat(
            [
                t.reshape(-1)
                for t in torch.autograd.grad(loss1, [task1.get_parameter(n) for n in names])
            ]
        )
        expected[f"ics/{layer}/l2"] = float((g - gp).norm())
        expected[f"ics/{layer}/cos"] = float(g @ gp / (g.norm() * gp.norm()))
        expected[f"ics/{layer}/l2_rel"] = float((g - gp).norm() / g.norm())
        if layer in inputs_of:
            u0, u1 = _units(inputs0[layer]), _units(inputs1[layer])
            expected[f"ics/{layer}/mean_shift"] = float(np.mean(np.abs(u1.mean(1) - u0.mean(1))))
            expected[f"ics/{layer}/std_shift"] = float(np.mean(np.abs(u1.std(1) - u0.std(1))))
            expected[f"ics/{layer}/emd"] = float(
                np.mean([wasserstein_distance(a, b) for a, b in zip(u0, u1, strict=True)])
            )
    assert set(params_of) <= {k.split("/")[1] for k in expected}
    return expected


CASES: dict[str, tuple[Callable[[], nn.Module], Groups, dict[str, str]]] = {
    "attn_batch_first": (
        lambda: AttnNet(batch_first=True),
        ATTN_GROUPS,
        {"net.inp": "net.inp", "net.attn": "net.attn", "net.head": "net.head"},
    ),
    "attn_seq_first": (
        lambda: AttnNet(batch_first=False),
        ATTN_GROUPS,
        {"net.inp": "net.inp", "net.attn": "net.attn", "net.head": "net.head"},
    ),
    "encoder": (
        EncoderNet,
        ENCODER_GROUPS,
        {
            "net.inp": "net.inp",
            "net.layer.self_attn": "net.layer.self_attn",
            "net.layer.linear1": "net.layer.linear1",
            "net.layer.linear2": "net.layer.linear2",
            "net.head": "net.head",
        },
    ),
    "functional": (
        FunctionalNet,
        FUNCTIONAL_GROUPS,
        {"net.custom": "net.custom", "net.head": "net.head"},
    ),
    "tied": (
        TiedNet,
        TIED_GROUPS,
        {"net.gate": "net.gate", "net.mid": "net.mid", "net.out": "net.out"},
    ),
}


def _fit(
    make: Callable[[], Task], kind: str, callbacks: list[Any], steps: int, logger: Any = False
) -> tuple[Task, pl.Trainer]:
    pl.seed_everything(0, verbose=False)
    task = make()
    t = trainer(callbacks, steps, logger=logger)
    t.fit(task, DataLoader(_data(kind), batch_size=8, shuffle=False))
    return task, t


@pytest.mark.parametrize("case", list(CASES))
def test_every_value_matches_definition(case: str) -> None:
    make_net, groups, inputs_of = CASES[case]
    kind = case if case in ("tied", "functional") else "seq"

    def make() -> Task:
        torch.manual_seed(1)
        return Task(make_net().double())

    if case == "attn_seq_first":  # the model takes (T, N, E): transpose each batch
        base = make

        def make() -> Task:
            task = base()
            task.net = _SeqFirst(task.net)
            return task

    recorder, logger = StateRecorder(), MemoryLogger()
    _fit(make, kind, [recorder, ICSCallback(every_n_steps=1)], steps=3, logger=logger)
    assert len(recorder.steps) == 3
    for record in recorder.steps:
        expected = brute_force_ics(make, _prefixed(groups, case), record, _inputs(inputs_of, case))
        got = {k: v for k, v in logger.history[record["step"]].items() if k.startswith("ics/")}
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
            if key.endswith("/cos"):
                assert -1.0 <= got[key] <= 1.0
        # everything after the first layer sees earlier parameters move
        later = [g for g, _ in groups if g is not None][1:]
        assert all(got[f"ics/{_name(g, case)}/l2"] > 0 for g in later)


class _SeqFirst(nn.Module):
    """Feeds a (N, T, E) batch to a sequence-first model as (T, N, E)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.inner = net

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x.transpose(0, 1))


def _name(layer: str, case: str) -> str:
    return layer.replace("net.", "net.inner.", 1) if case == "attn_seq_first" else layer


def _prefixed(groups: Groups, case: str) -> Groups:
    return [
        (None if g is None else _name(g, case), [_name(p, case) for p in ps]) for g, ps in groups
    ]


def _inputs(inputs_of: dict[str, str], case: str) -> dict[str, str]:
    return {_name(k, case): _name(v, case) for k, v in inputs_of.items()}
