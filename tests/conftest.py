from __future__ import annotations

import os

# W&B never reaches a server in tests: offline runs only, no account, no console noise.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
