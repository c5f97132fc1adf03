"""Training time with the three diagnostic callbacks together ÷ without, at several budgets.

``ICSCallback()``, ``LipschitzCallback()`` and ``SmoothnessCallback()`` at their defaults
(``every_n_steps="auto"``, one shared budget: the default 0.04, and each of ``--budgets``)
against no callback, on the digits MLP and the 13-conv ResNet of ``benchmarks/_models.py`` (batch
64, random data of the digits shapes, the same batch every step, SGD with momentum) and
``bertmlm``, a tiny-config Hugging Face BERT masked language model (2 layers, hidden 64, 2 heads,
vocabulary 1000, 32 tokens, batch 16, 15% of the tokens masked, AdamW), ``--steps`` steps per
fit. The fits alternate (``--rounds`` rounds of: none, default budget, 1%, 20%) so that load on
a shared machine hits them alike. Per model and budget it prints the median and range over the
rounds of: with ÷ without in process CPU time (``time.process_time``, what this process
computed) and in wall time; the in-run ratio; the spent fraction the ledger logged
(``budget/spent``: the diagnostics' seconds, measurements and hooks, ÷ training seconds) beside
the measured one; and how often each callback measured. Targets: ≤ 1.05 at the default budget,
≤ 1.02 at 1%, the logged spent fraction within ±20% of the measured one.

The in-run ratio comes from the fit with the callbacks alone: its CPU time ÷ (its CPU time − the
CPU time inside the callbacks' hooks, every step, measured or not), i.e. measured side by side in
one run, so a change of load between two fits (on a shared machine) does not move it; the
measured spent fraction is in-run − 1. It leaves out Lightning's dispatch of the first
callback's hooks; the with ÷ without ratios include everything, and everything the other
processes of a shared machine do to this one's caches and clock rate.

The ledger's clock is process CPU time here (``--clock cpu``, as the measured fractions; a
Trainer's default is wall time, ``time.perf_counter``).

Usage: ``python benchmarks/overhead_defaults.py [--models mlp resnet13 bertmlm] [--steps 2000]
[--rounds 5] [--budgets 0 0.01 0.2] [--clock cpu|wall] [--threads 1] [--device cpu|cuda]
[--precision 32-true] [--batch N] [--devices N]`` (budget 0: the default); with ``--devices 2``
or more each fit is a DDP run (one batch per rank, the schedule decided on rank zero and
broadcast) and rank zero prints.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import describe, make
from cost_table import Classifier, Repeat

from lightning_bn import ICSCallback, LipschitzCallback, SmoothnessCallback
from lightning_bn.callbacks.base import DiagnosticCallback


class MaskedLM(pl.LightningModule):
    """A tiny-config ``BertForMaskedLM`` (AdamW); the batch is ``(ids, labels)``."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertForMaskedLM

        config = BertConfig(
            vocab_size=1000,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=64,
        )
        self.bert = BertForMaskedLM(config)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        ids, labels = batch
        return self.bert(input_ids=ids, labels=labels).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def make_module(name: str, batch: int | None) -> tuple[pl.LightningModule, Any, str]:
    """The Lightning module, its one batch and a description."""
    if name != "bertmlm":
        model, data, _ = make(name, batch)
        return Classifier(model), data, describe(model, data)
    gen = torch.Generator().manual_seed(0)
    module = MaskedLM()
    ids = torch.randint(0, 1000, (batch or 16, 32), generator=gen)
    labels = torch.where(torch.rand(ids.shape, generator=gen) < 0.15, ids, -100)
    return module, (ids, labels), describe(module, (ids, labels))


HOOKS = (
    "setup",
    "on_fit_start",
    "on_train_start",
    "on_train_batch_start",
    "on_train_batch_end",
    "on_train_end",
    "on_fit_end",
)


SPENT = [0.0]  # process CPU time inside the diagnostic callbacks' hooks, this fit


def time_hooks() -> None:
    """Wrap the diagnostic callbacks' hooks (on the class, keeping their names, so that they
    sleep as usual between measurements) to add their process CPU time to ``SPENT[0]``."""
    for hook in HOOKS:
        original = getattr(DiagnosticCallback, hook)

        @functools.wraps(original)
        def timed(*a: Any, _original: Any = original, **k: Any) -> Any:
            t0 = time.process_time()
            try:
                return _original(*a, **k)
            finally:
                SPENT[0] += time.process_time() - t0

        setattr(DiagnosticCallback, hook, timed)


def fit(name: str, budget: float | None, args: Any) -> tuple[float, float, list[Any], int]:
    """(wall, cpu) seconds of one whole fit, the callbacks used and this process's rank;
    ``budget`` ``None``: no callback, ``0``: the callbacks' default budget."""
    torch.manual_seed(0)
    module, batch, _ = make_module(name, args.batch)
    b = budget or None
    callbacks: list[Any] = (
        [ICSCallback(budget=b), LipschitzCallback(budget=b), SmoothnessCallback(budget=b)]
        if budget is not None
        else []
    )
    for cb in callbacks:
        if args.clock == "cpu":
            cb.clock = time.process_time
    SPENT[0] = 0.0
    trainer = pl.Trainer(
        accelerator=args.device,
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        precision=args.precision,
        max_steps=args.steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    if args.device == "cuda":
        torch.cuda.synchronize()
    w0, c0 = time.perf_counter(), time.process_time()
    trainer.fit(module, Repeat(batch, args.steps))
    if args.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - w0, time.process_time() - c0, callbacks, trainer.global_rank


def spread(values: list[float]) -> str:
    """Median and range."""
    if not values:
        return "-"
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "resnet13", "bertmlm"])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rounds", "--repeats", type=int, default=5)
    parser.add_argument(
        "--budgets",
        nargs="+",
        type=float,
        default=[0.0, 0.01, 0.2],
        help="0: the callbacks' default budget",
    )
    parser.add_argument("--clock", default="cpu", choices=["wall", "cpu"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--batch", type=int, default=None, help="default: the model's own")
    parser.add_argument("--devices", type=int, default=1, help="> 1: DDP, one batch per rank")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    time_hooks()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(
        f"torch {torch.__version__}, device {args.device} x {args.devices},"
        f" {torch.get_num_threads()} thread(s), precision {args.precision}, {args.steps} steps"
        f" per fit, {args.rounds} interleaved rounds, budgets"
        f" {[b or 'default' for b in args.budgets]}, ledger clock {args.clock},"
        f" load average {os.getloadavg()[0]:.2f}"
    )
    for name in args.models:
        print(f"\n{name}: {make_module(name, args.batch)[2]}", flush=True)
        keys = ("cpu", "wall", "in-run", "logged", "measured")
        results = {b: {k: [] for k in keys} for b in args.budgets}
        counts: dict[float, list[str]] = {b: [] for b in args.budgets}
        warmup = args.devices > 1  # the first DDP fit also launches the ranks: not counted
        for i in range(args.rounds + warmup):
            w_none, c_none, _, _ = fit(name, None, args)
            line = [f"  round {i}: without {c_none:.1f} s CPU ({w_none:.1f} s wall)"]
            for budget in args.budgets:
                w_with, c_with, callbacks, rank = fit(name, budget, args)
                spent = list(SPENT)
                if rank or (warmup and i == 0):  # DDP: rank zero prints, after the warm-up
                    continue
                ledger = callbacks[0].ledger
                r = results[budget]
                r["cpu"].append(c_with / c_none)
                r["wall"].append(w_with / w_none)
                r["in-run"].append(c_with / (c_with - spent[0]))
                r["logged"].append(ledger.spent_fraction())
                r["measured"].append(spent[0] / (c_with - spent[0]))
                counts[budget].append("/".join(str(len(cb.measured_steps)) for cb in callbacks))
                line.append(
                    f"budget {budget or 'default'}: {c_with:.1f} s CPU ({c_with / c_none:.3f}),"
                    f" hooks {spent[0]:.2f} s, logged spent {ledger.spent_fraction():.4f},"
                    f" measurements {counts[budget][-1]}"
                )
            print("; ".join(line), flush=True)
        for budget in args.budgets:
            r = results[budget]
            if not r["cpu"]:
                continue
            logged, measured = statistics.median(r["logged"]), statistics.median(r["measured"])
            print(
                f"  {name}, budget {budget or 'default'}: with / without (CPU) {spread(r['cpu'])},"
                f" (wall) {spread(r['wall'])}; in-run {spread(r['in-run'])}; logged"
                f" `budget/spent` {spread(r['logged'])} vs measured in-run share"
                f" {spread(r['measured'])} (logged / measured {logged / measured:.2f});"
                f" measurements ICS/Lipschitz/Smoothness {', '.join(counts[budget])}",
                flush=True,
            )


if __name__ == "__main__":
    main()
