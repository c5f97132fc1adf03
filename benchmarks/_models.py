"""Models and data of the cost benchmarks (random data of the real shapes; plain torch).

- ``mlp``: the digits MLP of ``lightning-bn reproduce`` (64 inputs, 3 hidden layers of 128, BatchNorm,
  ReLU, 10 classes), batch 64;
- ``resnet13``: a ResNet with 13 convolutions on 8×8 one-channel digits images: a 3×3 stem, then three
  stages of two basic blocks (two 3×3 convolutions each, BatchNorm, ReLU, identity or 1×1-free
  strided shortcut by average pooling and zero-padded channels) of 16, 32, 64 channels, global
  average pooling and a linear head; 1 + 3 × 2 × 2 = 13 convolutions, batch 64;
- ``resnet18``: ResNet-18 at CIFAR size (3×32×32, 3×3 stem without max-pool, stages of 64, 128, 256,
  512 channels, 1×1 projection shortcuts), 10 classes;
- ``bert``: BERT-small (4 layers, hidden 512, 8 heads, intermediate 2048) from a
  ``transformers.BertConfig``, sequence classification with 2 labels, random token ids.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_bn.experiments.models import MLP


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, projection: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        self.pad = cout - cin
        self.pool = nn.AvgPool2d(stride) if stride > 1 and not projection else nn.Identity()
        if projection and (stride > 1 or cin != cout):
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )
            self.pad = 0

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = self.shortcut(self.pool(x))
        if self.pad:  # parameter-free shortcut: zero-padded channels (ResNet option A)
            skip = nn.functional.pad(skip, (0, 0, 0, 0, 0, self.pad))
        return torch.relu(out + skip)


class ResNet(nn.Module):
    def __init__(
        self,
        in_channels: int,
        widths: tuple[int, ...],
        blocks: int,
        num_classes: int = 10,
        projection: bool = False,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if (i and not b) else 1, projection))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layers(self.stem(x)).mean(dim=(2, 3)))


def resnet13() -> nn.Module:
    """13 convolutions: stem + 3 stages × 2 blocks × 2."""
    return ResNet(1, (16, 32, 64), 2)


def resnet18() -> nn.Module:
    """ResNet-18 (CIFAR variant): stem + 4 stages × 2 blocks × 2 = 17 convolutions + the head."""
    return ResNet(3, (64, 128, 256, 512), 2, projection=True)


class BertClassifier(nn.Module):
    """``BertForSequenceClassification`` returning logits for a ``(ids, labels)`` batch."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            vocab_size=30522,
            hidden_size=512,
            num_hidden_layers=4,
            num_attention_heads=8,
            intermediate_size=2048,
            num_labels=2,
        )
        self.bert = BertForSequenceClassification(config)

    def forward(self, ids: Tensor) -> Tensor:
        return self.bert(input_ids=ids).logits


def make(name: str, batch: int | None = None) -> tuple[nn.Module, tuple[Tensor, Tensor], int]:
    """``(model, one batch, num_classes)`` of a benchmark model; the batch is random."""
    gen = torch.Generator().manual_seed(0)
    model: nn.Module
    if name == "mlp":
        b = batch or 64
        model, x = MLP(64, (128, 128, 128), 10), torch.randn(b, 64, generator=gen)
        classes = 10
    elif name == "resnet13":
        b = batch or 64
        model, x = resnet13(), torch.randn(b, 1, 8, 8, generator=gen)
        classes = 10
    elif name == "resnet18":
        b = batch or 128
        model, x = resnet18(), torch.randn(b, 3, 32, 32, generator=gen)
        classes = 10
    elif name == "bert":
        b = batch or 8
        model = BertClassifier()
        x = torch.randint(0, 30522, (b, 128), generator=gen)
        classes = 2
    else:
        raise ValueError(f"unknown model {name!r}")
    y = torch.randint(0, classes, (x.shape[0],), generator=gen)
    return model, (x, y), classes


def available(name: str) -> str | None:
    """``None`` if the model can be built here, else why not."""
    if name == "bert":
        try:
            import transformers  # noqa: F401
        except ImportError:
            return "transformers is not installed"
    return None


def describe(model: nn.Module, batch: Any) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e6:.2f}M parameters, batch {tuple(batch[0].shape)}"
