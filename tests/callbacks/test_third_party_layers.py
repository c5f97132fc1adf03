"""Models written the way third-party libraries write them: fused norm+activation layers (timm's
``BatchNormAct2d``), RMS norms that are not torch classes (Hugging Face's ``T5LayerNorm``),
torch's RMSNorm / InstanceNorm / GroupNorm, fused attention (``F.scaled_dot_product_attention``).
Every number is compared with a brute force on a deep copy (autograd)."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_bn.callbacks import (
    ICSCallback,
    LipschitzCallback,
    NoiseInjectionCallback,
    SmoothnessCallback,
)
from lightning_bn.diagnostics.bounds import theorem41_bound
from lightning_bn.diagnostics.landscape import compute_smoothness
from lightning_bn.layers import is_norm_layer, is_rms_norm, overrides_norm_forward
from lightning_bn.layers.fused import register_norm_output_hook
from lightning_bn.noise import NoiseInjector, NoiseSampler, NoiseSeedStream
from lightning_bn.probe import Probe, StepRecord
from tests.support.models import Classifier, MemoryLogger, Recorder, fit

SILU_MIN = -0.2784645  # min over x of x * sigmoid(x)


class BatchNormAct1d(nn.BatchNorm1d):
    """As timm's ``BatchNormAct2d``: the torch norm's subclass returning ``act(drop(bn(x)))``."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__(num_features, eps=eps)
        self.drop = nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        x = F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            self.momentum or 0.0,
            self.eps,
        )
        return self.act(self.drop(x))


class HandWrittenNormAct(nn.BatchNorm1d):
    """Normalises by hand (no norm function) and applies an activation: cannot be split."""

    def forward(self, x: Tensor) -> Tensor:
        mu, var = x.mean(0), x.var(0, unbiased=False)
        return torch.relu((x - mu) / (var + self.eps).sqrt() * self.weight + self.bias)


class T5StyleLayerNorm(nn.Module):
    """As Hugging Face's ``T5LayerNorm``: an RMS norm that is no torch class."""

    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))


def fused_net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), BatchNormAct1d(16), nn.Linear(16, 3))


def _at(make: Any, state: dict[str, Tensor]) -> nn.Module:
    net = make().double()
    net.load_state_dict({k[len("net.") :]: v for k, v in state.items()})
    return net.train()


def test_fused_layer_is_detected() -> None:
    assert overrides_norm_forward(BatchNormAct1d(4))
    assert not overrides_norm_forward(nn.BatchNorm1d(4))
    assert not overrides_norm_forward(nn.Linear(4, 4))


def test_theorem41_at_the_norm_output_of_a_fused_layer() -> None:
    recorder, logger = Recorder(), MemoryLogger()
    fit(
        lambda: Classifier(fused_net().double(), optimizer="adam", lr=0.01),
        [recorder, LipschitzCallback(every_n_steps=1)],
        steps=3,
        logger=logger,
    )
    for record in recorder.steps:
        net = _at(fused_net, record["before"])  # a deep copy of the model at the step
        x, y = record["batch"]
        h = net[0](x)
        bn = net[1]
        z = F.batch_norm(h, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        a = F.silu(z)
        loss = F.cross_entropy(net[2](a), y)
        gh, gz, ga = torch.autograd.grad(loss, [h, z, a])
        res = theorem41_bound(h.detach(), gh, gz, bn.weight.detach(), bn.eps)
        expected = float(res.lhs.sum() / res.rhs.sum())
        wrong = theorem41_bound(h.detach(), gh, ga, bn.weight.detach(), bn.eps)
        assert abs(float(wrong.lhs.sum() / wrong.rhs.sum()) - expected) > 1e-2  # can fail
        got = logger.history[record["step"]]
        assert got["lipschitz/net.1/thm41_ratio"] == pytest.approx(expected, rel=1e-6)
        assert got["lipschitz/net.1/act_grad_norm"] == pytest.approx(float(gh.norm()), rel=1e-6)


def test_noise_goes_before_the_fused_activation() -> None:
    torch.manual_seed(0)
    layer = BatchNormAct1d(6).train()
    injector = NoiseInjector(NoiseSampler(), NoiseSeedStream(3), [("bn", layer)])
    injector.new_batch()
    handle = register_norm_output_hook(layer, lambda m, a, z: injector(0, z), name="bn")
    x = torch.randn(32, 6)
    out = layer(x)
    handle.remove()
    twin = nn.BatchNorm1d(6).train()
    expected = F.silu(injector(0, twin(x)))  # same seeds: same noise
    torch.testing.assert_close(out, expected)
    assert float(out.min()) >= SILU_MIN - 1e-6


def test_noise_callback_on_fused_layers_keeps_the_activation_floor() -> None:
    outs: list[Tensor] = []

    def keep(module: nn.Module, args: Any, output: Tensor) -> None:
        outs.append(output.detach())

    def make() -> Classifier:
        module = Classifier(fused_net().double())
        module.net[1].register_forward_hook(keep)
        return module

    callback = NoiseInjectionCallback(mean_range=2.0, std_range=2.0, log_every_n_steps=1)
    fit(make, [callback], steps=3)
    assert callback.target_names == ["net.1"]
    assert outs and min(float(o.min()) for o in outs) >= SILU_MIN - 1e-6


def test_a_fused_layer_that_cannot_be_split_is_skipped_with_one_warning() -> None:
    net = nn.Sequential(nn.Linear(8, 5), HandWrittenNormAct(5), nn.Linear(5, 3)).double()
    logger = MemoryLogger()
    with pytest.warns(UserWarning, match=r"`net.1` \(HandWrittenNormAct\).*skipped") as rec:
        fit(lambda: Classifier(net), [LipschitzCallback(every_n_steps=1)], steps=2, logger=logger)
    assert sum("HandWrittenNormAct" in str(w.message) for w in rec) == 1
    keys = {k for vals in logger.history.values() for k in vals}
    assert not any(k.startswith("lipschitz/net.1/") for k in keys)


class NormZoo(nn.Module):
    """A module list with torch's RMSNorm, InstanceNorm, GroupNorm and a library RMS norm."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [
                nn.Linear(8, 12),
                nn.RMSNorm(12),
                nn.Linear(12, 12),
                T5StyleLayerNorm(12),
                nn.Linear(12, 12),
                nn.GroupNorm(3, 12),
                nn.Linear(12, 12),
                nn.InstanceNorm1d(12, affine=True),
                nn.Linear(12, 3),
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            if isinstance(layer, nn.InstanceNorm1d):  # over a length-4 sequence of the features
                x = layer(x.unsqueeze(-1).expand(-1, -1, 4) * torch.arange(1.0, 5.0)).mean(-1)
            else:
                x = layer(x)
            if i % 2 == 1:
                x = torch.tanh(x)
        return x


NORMS = ["net.layers.1", "net.layers.3", "net.layers.5", "net.layers.7"]


def test_norm_layers_recognised_by_type_and_structure() -> None:
    zoo = NormZoo()
    assert [f"net.{n}" for n, m in zoo.named_modules() if n and is_norm_layer(m)] == NORMS
    assert is_rms_norm(zoo.layers[3]) and is_rms_norm(zoo.layers[1])
    assert not is_norm_layer(nn.Linear(3, 3)) and not is_rms_norm(nn.LayerNorm(3))


def test_norm_zoo_gets_noise_and_per_layer_values() -> None:
    recorder, logger = Recorder(), MemoryLogger()
    noise = NoiseInjectionCallback(log_every_n_steps=1)
    fit(
        lambda: Classifier(NormZoo().double()),
        [recorder, LipschitzCallback(every_n_steps=1)],
        steps=2,
        logger=logger,
    )
    fit(lambda: Classifier(NormZoo().double()), [noise], steps=1)
    assert noise.target_names == NORMS
    for record in recorder.steps:
        net = _at(NormZoo, record["before"])
        inputs: dict[str, Tensor] = {}
        for name in NORMS:
            module = net.get_submodule(name[len("net.") :])
            module.register_forward_pre_hook(
                lambda m, args, name=name, inputs=inputs: inputs.__setitem__(name, args[0])
            )
        x, y = record["batch"]
        loss = F.cross_entropy(net(x), y)
        grads = torch.autograd.grad(loss, [inputs[n] for n in NORMS])
        got = logger.history[record["step"]]
        for name, g in zip(NORMS, grads, strict=True):
            assert got[f"lipschitz/{name}/act_grad_norm"] == pytest.approx(
                float(g.norm()), rel=1e-6
            )


def test_no_norm_layer_warns_once_and_the_fit_goes_on() -> None:
    net = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    logger = MemoryLogger()
    callbacks = [NoiseInjectionCallback(), ICSCallback(every_n_steps=1)]
    with pytest.warns(UserWarning, match="targets=") as rec:
        fit(lambda: Classifier(net), callbacks, steps=2, logger=logger)
    assert sum("found no normalisation layer" in str(w.message) for w in rec) == 1
    assert any(k.startswith("ics/") for vals in logger.history.values() for k in vals)
    with pytest.raises(ValueError, match="found no module of the types"):  # asked explicitly
        fit(lambda: Classifier(copy.deepcopy(net)), [NoiseInjectionCallback(nn.GroupNorm)], 1)


class SDPANet(nn.Module):
    """A self-attention block calling ``F.scaled_dot_product_attention``, as HF models do."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(2, 8)
        self.qkv = nn.Linear(8, 24)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x.view(x.shape[0], 4, 2))  # 4 tokens of 2 features
        q, k, v = self.qkv(h).view(x.shape[0], 4, 3, 2, 4).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape[0], 4, 8)
        return self.head(torch.tanh(a).mean(1))


def test_smoothness_through_fused_attention_matches_the_full_hessian() -> None:
    torch.manual_seed(0)
    module = Classifier(SDPANet())  # float32: the fused CPU kernel's dtype
    probe = Probe(module)
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(16, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen))
    params = probe.parameters()
    names = list(params)
    shapes = [params[n].shape for n in names]
    twin = copy.deepcopy(module.net).double()

    def flat_loss(flat: Tensor) -> Tensor:
        out, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            out[n[len("net.") :]] = flat[i : i + s.numel()].view(s)
            i += s.numel()
        logits = torch.func.functional_call(twin, out, (batch[0].double(),))
        return F.cross_entropy(logits, batch[1])

    flat0 = torch.cat([params[n].reshape(-1).double() for n in names])
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        hess = torch.autograd.functional.hessian(flat_loss, flat0)
    eigs = torch.linalg.eigvalsh(hess)
    dominant = float(eigs[eigs.abs().argmax()])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Hessian failed" warning
        result = compute_smoothness(
            probe, params, StepRecord(batch), [0.1], max_iters=200, tol=1e-7
        )
    assert result.metrics["hessian_top_eig"] == pytest.approx(dominant, rel=1e-3)
    assert result.metrics["beta_eff"] > 0


class _TanhGrad(torch.autograd.Function):
    """The derivative of tanh, itself without a derivative (as a fused kernel's backward)."""

    @staticmethod
    def forward(ctx: Any, grad: Tensor, x: Tensor) -> Tensor:
        return grad * (1 - x.tanh() ** 2)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Any:
        raise RuntimeError("derivative for _TanhGrad is not implemented")


class _NoDoubleBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x.tanh()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return _TanhGrad.apply(grad, x)


class NoHessianNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(_NoDoubleBackward.apply(self.a(x)))


def test_first_order_quantities_logged_when_the_hessian_fails() -> None:
    logger = MemoryLogger()
    with pytest.warns(UserWarning, match="no Hessian quantities"):
        fit(
            lambda: Classifier(NoHessianNet().double()),
            [SmoothnessCallback(every_n_steps=1, max_iters=3)],
            steps=2,
            logger=logger,
        )
    keys = {k for vals in logger.history.values() for k in vals}
    assert "smoothness/beta_eff" in keys and "smoothness/grad_diff_max" in keys
    assert "smoothness/hessian_top_eig" not in keys


def test_peak_memory_of_a_measurement_is_logged() -> None:
    from lightning_bn.probe.memory import PeakMemory

    with PeakMemory() as memory:
        block = torch.ones(50 * 1024 * 1024 // 8, dtype=torch.float64)  # 50 MiB, touched
    assert 40 <= memory.host_mb < 1000
    del block
    logger = MemoryLogger()
    callback = SmoothnessCallback(every_n_steps=1, max_iters=3)
    callback.log_peak_memory = True
    fit(
        lambda: Classifier(fused_net().double()),
        [callback],
        steps=1,
        logger=logger,
    )
    assert logger.history[0]["smoothness/peak_mem_mb"] >= 0
    assert "smoothness/peak_cuda_mem_mb" not in logger.history[0]  # on the CPU
