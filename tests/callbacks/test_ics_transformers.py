"""Hugging Face BERT and GPT-2 built from tiny configs (no weights downloaded): ICS measures every
weight-bearing layer, the values are finite, and training is bitwise untouched."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn.callbacks.ics import ICSCallback
from lightning_bn.callbacks.lipschitz import LipschitzCallback
from lightning_bn.callbacks.smoothness import SmoothnessCallback
from lightning_bn.layers import is_norm_layer
from tests.support.models import MemoryLogger, trainer

transformers = pytest.importorskip("transformers")

VOCAB = 40


def _bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        attn_implementation="eager",
    )
    return transformers.BertForMaskedLM(config)


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=16,
        attn_implementation="eager",
    )
    return transformers.GPT2LMHeadModel(config)


class LM(pl.LightningModule):
    def __init__(self, make: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = make().double()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _fit(make: Any, callbacks: list[Any], logger: Any = False) -> tuple[LM, pl.Trainer]:
    pl.seed_everything(0, verbose=False)
    ids = torch.randint(0, VOCAB, (12, 8), generator=torch.Generator().manual_seed(0))
    module = LM(make)
    t = trainer(callbacks, 3, logger=logger)
    t.fit(module, DataLoader(TensorDataset(ids), batch_size=4))
    return module, t


def _weight_bearing(model: nn.Module, prefix: str) -> set[str]:
    """Modules owning (by their qualified parameter names) a trainable matrix, norms excluded;
    a tensor held under several names (tied) belongs to the module holding its last name."""
    last: dict[int, tuple[str, nn.Parameter]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        last[id(p)] = (name, p)
    owners = {
        name.rpartition(".")[0] for name, p in last.values() if p.requires_grad and p.dim() >= 2
    }
    return {
        f"{prefix}{n}" for n, m in model.named_modules() if n in owners and not is_norm_layer(m)
    }


@pytest.mark.parametrize("make", [_bert, _gpt2], ids=["bert", "gpt2"])
def test_every_weight_bearing_layer_measured(make: Any) -> None:
    logger = MemoryLogger()
    module, _ = _fit(make, [ICSCallback(every_n_steps=1)], logger=logger)
    expected = _weight_bearing(module.model, "model.")
    if make is _gpt2:  # Conv1D layers, not nn.Linear; lm_head's weight is the tied wte
        assert "model.transformer.h.0.attn.c_attn" in expected
        # the tied weight is measured at the output layer, its last holder and last use
        assert "model.lm_head" in expected and "model.transformer.wte" not in expected
    else:  # the decoder's weight is tied to the word embeddings, its bias to cls.predictions.bias
        assert "model.bert.encoder.layer.0.attention.self.query" in expected
        assert "model.cls.predictions.decoder" in expected
        assert "model.bert.embeddings.word_embeddings" not in expected
    for step in range(3):
        values = {k: v for k, v in logger.history[step].items() if k.startswith("ics/")}
        layers = {k.split("/")[1] for k in values}
        assert expected <= layers, sorted(expected - layers)
        assert all(math.isfinite(v) for v in values.values())
        assert all(-1.0 <= v <= 1.0 for k, v in values.items() if k.endswith("/cos"))
        # everything but the first layer used sees earlier weights move
        assert sum(v > 0 for k, v in values.items() if k.endswith("/l2")) >= len(expected) - 1


@pytest.mark.parametrize("make", [_bert, _gpt2], ids=["bert", "gpt2"])
def test_no_observer_effect(make: Any) -> None:
    m0, t0 = _fit(make, [])
    callbacks = [
        ICSCallback(every_n_steps=1),
        LipschitzCallback(every_n_steps=1),
        SmoothnessCallback(every_n_steps=2, max_iters=2),
    ]
    m1, t1 = _fit(make, callbacks)
    for key, value in m0.state_dict().items():
        assert torch.equal(m1.state_dict()[key], value), key
    s0, s1 = t0.optimizers[0].state_dict()["state"], t1.optimizers[0].state_dict()["state"]
    for key, value in s0.items():
        for name, tensor in value.items():
            assert torch.equal(torch.as_tensor(s1[key][name]), torch.as_tensor(tensor)), name
