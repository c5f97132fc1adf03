"""Training time with the three diagnostic callbacks together at their defaults ÷ without.

``ICSCallback()``, ``LipschitzCallback()`` and ``SmoothnessCallback()`` at their defaults
(``every_n_steps="auto"``, one shared budget, 0.04 unless ``--budget``) against no callback, on
the digits MLP and the 13-conv ResNet of ``benchmarks/_models.py`` (batch 64, random data of the
digits shapes, the same batch every step, SGD with momentum) and ``bertmlm``, a tiny-config
Hugging Face BERT masked language model (2 layers, hidden 64, 2 heads, vocabulary 1000, 32
tokens, batch 16, 15% of the tokens masked, AdamW), ``--steps`` steps per fit. The two fits
alternate (``--repeats`` rounds: none, with, none, with, ...) so that load on a shared machine
hits both alike; every ratio, the median and the minimum are printed, in process CPU time
(``time.process_time``, what this process computed) and wall time, with how often each callback
measured and the spent fraction the ledger logged (``budget/spent``: the diagnostics' seconds ÷
training seconds) beside the measured one (in-run ratio − 1). Target: ≤ 1.05 at the default.

A third ratio ("in-run") comes from the fit with the callbacks alone: its CPU time ÷ (its CPU time
− the CPU time inside the callbacks' hooks), i.e. measured side by side in one run, so a change of
load between the two fits (on a shared machine) does not move it. It leaves out what the
callbacks cost outside their own hooks (Lightning calling three more callbacks' hooks at every
step); the with ÷ without ratios include that.

The ratio includes the calibration: each callback measures at step 0 (cold, its most expensive
measurement) and then at its interval, so a run much shorter than the longest interval chosen
pays the first measurements without amortising them.

Usage: ``python benchmarks/overhead_defaults.py [--models mlp resnet13] [--steps 2000]
[--repeats 3] [--budget B] [--clock wall|cpu] [--threads 1] [--device cpu|cuda]
[--precision 32-true] [--batch N] [--devices N]``; ``--clock cpu`` makes the ledger time with
``time.process_time`` (less sensitive to other processes on a shared machine); with ``--devices 2`` or more each fit is a DDP run (one batch per rank, the
callbacks' calibration decided on rank zero and broadcast) and rank zero prints.
"""

from __future__ import annotations

import argparse
import logging
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


HOOKS = ("setup", "on_fit_start", "on_train_batch_start", "on_train_batch_end", "on_fit_end")


def time_hooks(callback: Any, spent: list[float]) -> None:
    """Add the process CPU time inside the callback's hooks to ``spent[0]``."""
    for hook in HOOKS:
        original = getattr(callback, hook)

        def timed(*a: Any, _original: Any = original, **k: Any) -> Any:
            t0 = time.process_time()
            try:
                return _original(*a, **k)
            finally:
                spent[0] += time.process_time() - t0

        setattr(callback, hook, timed)


def fit(
    name: str, with_callbacks: bool, args: Any, spent: list[float] | None = None
) -> tuple[float, float, list[Any], int]:
    """(wall, cpu) seconds of one whole fit, the callbacks used and this process's rank."""
    torch.manual_seed(0)
    module, batch, _ = make_module(name, args.batch)
    b = args.budget
    callbacks: list[Any] = (
        [ICSCallback(budget=b), LipschitzCallback(budget=b), SmoothnessCallback(budget=b)]
        if with_callbacks
        else []
    )
    for cb in callbacks:
        if args.clock == "cpu":
            cb.clock = time.process_time
        if spent is not None:
            time_hooks(cb, spent)
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


def fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "resnet13", "bertmlm"])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=None, help="default: the callbacks'")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--batch", type=int, default=None, help="default: the model's own")
    parser.add_argument("--devices", type=int, default=1, help="> 1: DDP, one batch per rank")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(
        f"torch {torch.__version__}, device {args.device} x {args.devices},"
        f" {torch.get_num_threads()} thread(s), precision {args.precision}, {args.steps} steps"
        f" per fit, {args.repeats} interleaved rounds, budget {args.budget or 'default'},"
        f" ledger clock {args.clock}"
    )
    for name in args.models:
        print(f"\n{name}: {make_module(name, args.batch)[2]}", flush=True)
        ratios: dict[str, list[float]] = {"cpu": [], "wall": [], "in-run": [], "logged": []}
        chosen = ""
        warmup = args.devices > 1  # the first DDP fit also launches the ranks: not counted
        for i in range(args.repeats + warmup):
            w_none, c_none, _, _ = fit(name, False, args)
            spent = [0.0]
            w_with, c_with, callbacks, rank = fit(name, True, args, spent)
            if rank or (warmup and i == 0):  # DDP: rank zero prints, after the warm-up round
                continue
            ratios["cpu"].append(c_with / c_none)
            ratios["wall"].append(w_with / w_none)
            ratios["in-run"].append(c_with / (c_with - spent[0]))
            ledger = callbacks[0].ledger
            ratios["logged"].append(1 + ledger.spent_fraction())
            chosen = ", ".join(
                f"{type(cb).__name__}: {len(cb.measured_steps)} measurements, last interval"
                f" {cb.every_n_steps}, spent {ledger.spent_fraction(cb.state_key):.4f}"
                for cb in callbacks
            ) + (
                f"; logged spent {ledger.spent_fraction():.4f} vs measured in-run"
                f" {spent[0] / (c_with - spent[0]):.4f}"
            )
            print(
                f"  round: without {w_none:.1f} s wall / {c_none:.1f} s CPU, with"
                f" {w_with:.1f} s / {c_with:.1f} s ({spent[0]:.2f} s CPU inside the callbacks'"
                f" hooks); {chosen}",
                flush=True,
            )
        for clock, r in ratios.items():
            if not r:
                break
            print(
                f"  {name} ({clock} time) with / without = {statistics.median(r):.3f} (median;"
                f" min {min(r):.3f}, all {fmt(r)}; target <= 1.05 at the default budget)"
            )


if __name__ == "__main__":
    main()
