"""Every callback configured from YAML through LightningCLI."""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from lightning_bn import ICSCallback, LipschitzCallback, NoiseInjectionCallback, SmoothnessCallback
from tests.support.models import CLIClassifier, RandomData

CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: 4
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  log_every_n_steps: 1
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args:
      save_dir: {save_dir}
      name: cli
  callbacks:
    - class_path: lightning_bn.ICSCallback
      init_args:
        every_n_steps: 2
        layers: ["net.0", "net.4"]
        distributional: false
    - class_path: lightning_bn.LipschitzCallback
      init_args:
        every_n_steps: 2
        step_sizes: [0.5, 1.0, 2.0]
    - class_path: lightning_bn.SmoothnessCallback
      init_args:
        every_n_steps: 3
        power_iters: 4
        tol: 0.01
    - class_path: lightning_bn.NoiseInjectionCallback
      init_args:
        targets: ["net.1"]
        seed: 7
        log_every_n_steps: 2
model:
  width: 12
  lr: 0.1
data:
  n: 64
  batch_size: 16
"""


def test_fit_from_yaml(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(save_dir=tmp_path))
    cli = LightningCLI(
        CLIClassifier,
        RandomData,
        args=["fit", "--config", str(config)],
        save_config_callback=None,
    )
    by_type = {type(cb): cb for cb in cli.trainer.callbacks}
    ics = by_type[ICSCallback]
    assert (ics.every_n_steps, ics.layers, ics.distributional) == (2, ["net.0", "net.4"], False)
    assert by_type[LipschitzCallback].step_sizes == (0.5, 1.0, 2.0)
    assert (by_type[SmoothnessCallback].power_iters, by_type[SmoothnessCallback].tol) == (4, 0.01)
    noise = by_type[NoiseInjectionCallback]
    assert noise.seed == 7 and noise.target_names == ["net.1"]
    assert not cli.model.net[1]._forward_hooks  # removed at teardown
    assert cli.trainer.global_step == 4
    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    steps = {key: sorted(int(r["step"]) for r in rows if r.get(key)) for key in rows[0]}
    assert steps["ics/net.4/l2"] == [0, 2] and "ics/net.8/l2" not in steps
    assert "ics/net.4/emd" not in steps  # distributional: false
    assert steps["lipschitz/loss_range"] == [0, 2]
    assert steps["smoothness/hessian_top_eig"] == [0, 3]
    assert steps["noise/net.1/out_std"] == [0, 2]
