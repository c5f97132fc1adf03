"""The callbacks from a LightningCLI YAML file: no Python changes to a CLI-driven project.

    python examples/lightning_cli.py fit --config examples/lightning_cli.yaml
    python examples/lightning_cli.py fit --config examples/lightning_cli.yaml --trainer.max_steps 50

``examples/lightning_cli.yaml`` adds ``lightning_bn.ICSCallback``, ``LipschitzCallback`` and
``SmoothnessCallback`` under ``trainer.callbacks`` (``class_path`` + ``init_args``) and trains
lightning-bn's MLP on scikit-learn's digits; any LightningModule and data module of yours can
take their place (``model.class_path``, ``data.class_path``).
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI


def main() -> None:
    LightningCLI(save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
