from __future__ import annotations

import os

# W&B never reaches a server in tests: offline runs only, no account, no console noise.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")

import torch

# Tests run two per machine (pytest -n 2 on 2 cores): one intra-op thread each avoids
# oversubscription, which makes tiny kernels orders of magnitude slower.
torch.set_num_threads(1)
