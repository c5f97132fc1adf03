"""Hugging Face T5 and ViT from tiny configs (random weights, nothing downloaded): T5's RMS norms
get noise and per-layer values, its tied ``lm_head`` is measured, and the smoothness callback's
defaults work through ViT's fused attention."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn.callbacks import (
    ICSCallback,
    LipschitzCallback,
    NoiseInjectionCallback,
    SmoothnessCallback,
)
from tests.support.models import MemoryLogger, trainer

transformers = pytest.importorskip("transformers")

VOCAB = 32


def _t5() -> nn.Module:
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=16,
        d_kv=8,
        d_ff=24,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        tie_word_embeddings=True,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(config)


def _vit() -> nn.Module:
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        num_labels=3,
        attn_implementation="sdpa",
    )
    return transformers.ViTForImageClassification(config)


class T5Task(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = _t5()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        ids, labels = batch
        return self.model(input_ids=ids, labels=labels).loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class ViTTask(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = _vit()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return self.model(pixel_values=x, labels=y).loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def _t5_data() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (8, 6), generator=gen)
    labels = torch.randint(1, VOCAB, (8, 4), generator=gen)
    return DataLoader(TensorDataset(ids, labels), batch_size=4)


def test_t5_norms_get_noise_and_values_and_the_tied_head_is_measured() -> None:
    pl.seed_everything(0, verbose=False)
    task, logger = T5Task(), MemoryLogger()
    norms = [n for n, m in task.named_modules() if type(m).__name__ == "T5LayerNorm"]
    noise = NoiseInjectionCallback(log_every_n_steps=1)
    callbacks = [noise, LipschitzCallback(every_n_steps=1), ICSCallback(every_n_steps=1)]
    trainer(callbacks, 2, logger=logger).fit(task, _t5_data())
    assert norms and noise.target_names == norms
    got = logger.history[0]
    for name in norms:
        assert math.isfinite(got[f"lipschitz/{name}/act_grad_norm"]), name
        assert f"noise/{name}/out_std" in got
    # the shared embedding is measured at lm_head, where every other layer precedes it
    assert "ics/model.lm_head/l2" in got and got["ics/model.lm_head/l2"] > 0
    assert not any(k.startswith("ics/model.shared/") for k in got)


def test_vit_smoothness_defaults_through_sdpa() -> None:
    pl.seed_everything(0, verbose=False)
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 3, (8,)))
    logger = MemoryLogger()
    callback = SmoothnessCallback(every_n_steps=1, max_iters=5)
    trainer([callback], 2, logger=logger).fit(ViTTask(), DataLoader(data, batch_size=4))
    for step in (0, 1):
        got = logger.history[step]
        assert math.isfinite(got["smoothness/beta_eff"])
        assert math.isfinite(got["smoothness/hessian_top_eig"])
