"""Cost of one measurement of each diagnostic callback, in training steps, next to its pass count.

For each model (see ``benchmarks/_models.py``: the digits MLP, a 13-conv ResNet on 8×8 digits
images, ResNet-18 at CIFAR size, BERT-small from a config; random data of the real shapes) it
prints one training step's time and, per callback, one measurement ÷ one training step next to
the passes its definition needs and the ratio measurement ÷ (those passes, timed on the plain
model). Target of issue 15: ratio ≤ 1.3.

How it is measured. One Lightning fit per callback (SGD, momentum 0.9, lr 0.05, the same batch
every step), the callback at ``every_n_steps=2`` (so steps 0, 2, 4, ... are measured; step 0 is a
warm-up and not counted). The callback's hooks are wrapped with timers (what a measurement costs is
the time inside them at a measured step), and a first callback times each training step from its
``on_train_batch_start`` to its ``on_train_batch_end`` at the unmeasured steps (forward, backward,
optimiser step; data loading and Lightning's logging outside it; the medians are printed). At
each of those unmeasured steps, right after it, the same callback also times one forward+backward
pass (``loss.backward()``) and one forward pass (no grad) of a separate plain copy of the model on
the same batch, so that measurements, training steps and plain passes are timed side by side in
the same fits (a change of load on a shared machine hits all three alike). The medians of the
plain passes give the pass count its time:

- ICS: ``k`` forward+backward passes for ``k`` measured layers (one pass gives every
  :math:`G_{t,i}`, each other :math:`G'_{t,i}` one pass), ``k`` read from the logged keys;
- Lipschitz: 1 forward+backward (the gradient :math:`g_t`, which also gives the Theorem 4.1
  gradients) + 13 forward passes (the loss at each of the 13 default step sizes);
- Smoothness: 1 + 13 forward+backward (:math:`g_t` and the gradient at each step size) + 2 per
  Hessian-vector product (a backward through the kept first-order graph costs about a forward and
  a backward): the eigenvalue iteration's products, read from the logged
  ``smoothness/hessian_iters`` (warm starts), and one more for :math:`g^\top H g`.

Time is process CPU time (``time.process_time``; on a shared machine it leaves out others' time,
and with 1 thread it is the work done) and wall time; on CUDA wall time with the device
synchronised at the edges of the timed regions.

Usage: ``python benchmarks/cost_table.py [--models mlp resnet13 resnet18 bert] [--repeats 3]
[--threads 1] [--device cpu|cuda] [--precision 32-true|bf16-mixed] [--batch-resnet18 N]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import available, describe, make

from lightning_bn import ICSCallback, LipschitzCallback, SmoothnessCallback
from lightning_bn.callbacks.base import DiagnosticCallback

CALLBACKS: dict[str, Callable[[], DiagnosticCallback]] = {
    "ICS": lambda: ICSCallback(every_n_steps=2),
    "Lipschitz": lambda: LipschitzCallback(every_n_steps=2),
    "Smoothness": lambda: SmoothnessCallback(every_n_steps=2),
}


class Classifier(pl.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class Repeat:
    """The same batch ``n`` times (a plain list would be read as a list of loaders)."""

    def __init__(self, batch: Any, n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Any:
        return iter([self.batch] * self.n)


class Clock:
    """Wall and CPU time, with the device synchronised first on CUDA."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def __call__(self) -> tuple[float, float]:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()


def _sub(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return a[0] - b[0], a[1] - b[1]


class StepTimer(pl.Callback):
    """Times every training step (first in the callback list), and at every unmeasured step after
    it the plain model's passes (``plain``: a callable returning ``(fb, f)`` (wall, cpu) pairs),
    so that a measurement and the passes it is compared with are timed side by side."""

    def __init__(self, clock: Clock, plain: Callable[[], Any] | None = None) -> None:
        self.clock = clock
        self.plain = plain
        self.steps: dict[int, tuple[float, float]] = {}
        self.passes: list[Any] = []
        self._t0: tuple[float, float] = (0.0, 0.0)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._t0 = self.clock()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        step = trainer.global_step - 1
        self.steps[step] = _sub(self.clock(), self._t0)
        if self.plain is not None and step % 2 == 1:
            self.passes.append(self.plain())


def wrap_hooks(callback: DiagnosticCallback, clock: Clock) -> dict[int, list[float]]:
    """Accumulate the time inside the callback's batch hooks per step: ``{step: [wall, cpu]}``."""
    spent: dict[int, list[float]] = {}
    for hook in ("on_train_batch_start", "on_train_batch_end"):
        original = getattr(callback, hook)

        def timed(trainer: pl.Trainer, *args: Any, _original: Any = original, _hook: str = hook):
            step = trainer.global_step - (_hook == "on_train_batch_end")
            t0 = clock()
            _original(trainer, *args)
            wall, cpu = _sub(clock(), t0)
            acc = spent.setdefault(step, [0.0, 0.0])
            acc[0] += wall
            acc[1] += cpu

        setattr(callback, hook, timed)
    return spent


def fit(
    model: nn.Module,
    batch: Any,
    callback: DiagnosticCallback,
    steps: int,
    args: Any,
    plain: Callable[[], Any] | None = None,
) -> tuple[dict[int, list[float]], dict[int, tuple[float, float]], list[Any]]:
    clock = Clock(args.device == "cuda")
    timer = StepTimer(clock, plain)
    spent = wrap_hooks(callback, clock)
    trainer = pl.Trainer(
        accelerator=args.device,
        devices=1,
        precision=args.precision,
        max_steps=steps,
        callbacks=[timer, callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Classifier(model), Repeat(batch, steps))
    return spent, timer.steps, timer.passes


class PlainPasses:
    """One forward+backward and one forward of the plain model per call: ``((wall, cpu), (wall,
    cpu))``; the first call is a warm-up whose times are returned too (the caller skips it)."""

    def __init__(self, model: nn.Module, batch: Any, args: Any) -> None:
        self.device = torch.device(args.device)
        self.model = model.to(self.device)
        self.x, self.y = (t.to(self.device) for t in batch)
        self.clock = Clock(args.device == "cuda")
        self.dtype = torch.bfloat16 if args.precision.startswith("bf16") else None

    def loss(self) -> Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            return nn.functional.cross_entropy(self.model(self.x), self.y)

    def __call__(self) -> tuple[tuple[float, float], tuple[float, float]]:
        t0 = self.clock()
        self.model.zero_grad(set_to_none=True)
        self.loss().backward()
        t1 = self.clock()
        with torch.no_grad():
            self.loss()
        t2 = self.clock()
        return _sub(t1, t0), _sub(t2, t1)


def measure_model(name: str, args: Any) -> None:
    why = available(name)
    if why is not None:
        print(f"{name}: skipped ({why})")
        return
    batch_size = args.batch_resnet18 if name == "resnet18" else None
    model, batch, _ = make(name, batch_size)
    print(f"\n{name}: {describe(model, batch)}", flush=True)
    steps = 2 * args.repeats + 2
    rows = []
    step_times: list[tuple[float, float]] = []
    plain_times: list[Any] = []
    plain_model = PlainPasses(make(name, batch_size)[0], batch, args)
    plain_model()  # warm-up
    for label, factory in CALLBACKS.items():
        torch.manual_seed(0)
        fresh, _, _ = make(name, batch_size)
        callback = factory()
        spent, steps_t, timed = fit(fresh, batch, callback, steps, args, plain_model)
        measured = [spent[s] for s in callback.measured_steps if s >= 2 and s in spent]
        plain = [steps_t[s] for s in steps_t if s % 2 == 1 and s >= 1]
        step_times += plain
        plain_times += timed
        keys = callback.panel_history.keys()
        if label == "ICS":
            k = len({key.split("/")[1] for key in keys if key.startswith("ics/")})
            passes, n_fb, n_f = f"{k} (k={k} layers)", k, 0
        elif label == "Lipschitz":
            passes, n_fb, n_f = "1 + 13 fwd", 1, 13
        else:
            _, iters = callback.panel_history.series("smoothness/hessian_iters")
            later = iters[1:] or iters
            mean_iters = statistics.mean(later) if later else 0.0
            passes = f"14 + 2x({mean_iters:.1f}+1) HVP"
            n_fb, n_f = 14 + 2 * (mean_iters + 1), 0
        rows.append((label, measured, passes, n_fb, n_f))
    fb_wall, fb_cpu = (statistics.median(p[0][i] for p in plain_times) for i in (0, 1))
    f_wall, f_cpu = (statistics.median(p[1][i] for p in plain_times) for i in (0, 1))
    col = 1 if args.device == "cpu" else 0  # CPU time on CPU, wall time on CUDA
    step = statistics.median(t[col] for t in step_times)
    unit = "CPU" if col else "wall"
    print(
        f"  one training step {step * 1e3:.1f} ms {unit} (median of {len(step_times)}; plain"
        f" passes: medians of {len(plain_times)}, timed at the same unmeasured steps);"
        f" plain forward+backward {(fb_cpu if col else fb_wall) * 1e3:.1f} ms,"
        f" forward {(f_cpu if col else f_wall) * 1e3:.1f} ms"
    )
    print(f"  {'callback':<11} {'measurement / step':>19} {'passes needed':>20}"
          f" {'needed / step':>14} {'ratio (target <= 1.3)':>22}")  # fmt: skip
    fb = fb_cpu if col else fb_wall
    fw = f_cpu if col else f_wall
    for label, measured, passes, n_fb, n_f in rows:
        cost = statistics.median(m[col] for m in measured)
        needed = n_fb * fb + n_f * fw
        print(
            f"  {label:<11} {cost / step:>19.2f} {passes:>20} {needed / step:>14.2f}"
            f" {cost / needed:>22.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "resnet13", "resnet18", "bert"])
    parser.add_argument("--repeats", type=int, default=3, help="measurements counted per fit")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--batch-resnet18", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(
        f"torch {torch.__version__}, device {args.device}"
        f" ({torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}),"
        f" {torch.get_num_threads()} thread(s), precision {args.precision}"
    )
    for name in args.models:
        measure_model(name, args)


if __name__ == "__main__":
    main()
