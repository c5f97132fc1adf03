"""A new diagnostic declares its keys on its callback class, and nothing else needs an edit.

The worked example of docs/architecture.md (``examples/new_diagnostic.py``, a callback that
logs ``gradnorm/<parameter>``) is fitted alone with a CSVLogger and with an offline
WandbLogger: ``lightning-bn plot`` draws its declared panel with the declared title and
caption, and the W&B run gets the declared summary and chart. No table of the package names
``gradnorm``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import lightning.pytorch as pl
import pytest
import wandb
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning_bn.cli import main
from lightning_bn.logging import keys
from lightning_bn.logging.csv_log import read_csv_log
from lightning_bn.logging.wandb import STEP_METRIC
from tests.logging.test_wandb_panels import _isolate_wandb
from tests.support.models import Classifier, loader, mlp, trainer
from tests.support.wandb_offline import wait_for_finished_run

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "lightning_bn"


@pytest.fixture
def example() -> Iterator[ModuleType]:
    """The worked example, loaded from its file (defining its callback declares its keys)."""
    spec = importlib.util.spec_from_file_location(
        "new_diagnostic", ROOT / "examples" / "new_diagnostic.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    keys.forget("GradNormCallback")


def test_no_table_of_the_package_names_the_new_diagnostic() -> None:
    hits = [p for p in SRC.rglob("*.py") if "gradnorm" in p.read_text()]
    assert hits == []


def test_declaration_reaches_summaries_prefixes_and_panels(example: ModuleType) -> None:
    assert keys.summaries()["gradnorm/*"] == "max"
    assert "gradnorm/" in keys.prefixes()
    # order 1000 (the default) puts it after the paper's panels
    assert keys.panels()[-1].key == "panels/gradnorm"


def test_builtin_declarations_give_the_tables_of_0_1_0() -> None:
    """The declarations on the built-in callbacks reproduce the tables 0.1.0 wrote out, plus the
    keys and panels added since (``smoothness/hessian_converged``, the HessianCallback's)."""
    from lightning_bn.callbacks import PAPER_PANELS, PAPER_SUMMARIES

    assert {
        "budget/spent": "last",
        "ics/*/l2": "max",
        "ics/*/l2_rel": "max",
        "ics/*/cos": "min",
        "ics/*/mean_shift": "max",
        "ics/*/std_shift": "max",
        "ics/*/emd": "max",
        "lipschitz/loss": "last",
        "lipschitz/loss_min": "min",
        "lipschitz/loss_max": "max",
        "lipschitz/loss_range": "max",
        "lipschitz/grad_norm": "max",
        "lipschitz/*/act_grad_norm": "max",
        "lipschitz/*/thm41_ratio": "max",
        "noise/*": "last",
        "smoothness/grad_diff_min": "min",
        "smoothness/grad_diff_max": "max",
        "smoothness/beta_eff": "max",
        "smoothness/hessian_top_eig": "max",
        "smoothness/grad_curvature": "max",
        "smoothness/hessian_iters": "last",
        "smoothness/hessian_converged": "min",
        "hessian/eig_converged": "min",
        "hessian/eig_iters": "max",
        "hessian/eig_*": "max",
        "hessian/trace": "max",
        "hessian/trace_stderr": "max",
        "hessian/trace_converged": "min",
        "hessian/trace_samples": "max",
        "hessian/precond_eig_max": "max",
        "hessian/precond_converged": "min",
        "hessian/stability_threshold": "last",
        "hessian/density/*": "none",
        "hessian/*/trace": "max",
        "hessian/*/trace_stderr": "max",
        "hessian/*/eig_max": "max",
        "hessian/*/eig_converged": "min",
        # the extra peak memory of one measurement (host, CUDA)
        **{
            f"{c}/peak{d}_mem_mb": "max"
            for c in ("ics", "lipschitz", "smoothness", "hessian")
            for d in ("", "_cuda")
        },
    } == PAPER_SUMMARIES
    assert [(p.key, p.lines) for p in PAPER_PANELS] == [
        (
            "panels/loss_range",
            (("lipschitz/loss_min", "min over η"), ("lipschitz/loss_max", "max over η")),
        ),
        (
            "panels/grad_predictiveness",
            (
                ("smoothness/grad_diff_min", "min over η"),
                ("smoothness/grad_diff_max", "max over η"),
            ),
        ),
        ("panels/beta_smoothness", (("smoothness/beta_eff", "β_eff"),)),
        ("panels/ics_l2", (("ics/{layer}/l2", "{layer}"),)),
        ("panels/ics_cos", (("ics/{layer}/cos", "{layer}"),)),
        ("panels/thm41_ratio", (("lipschitz/{layer}/thm41_ratio", "{layer}"),)),
        ("panels/act_grad_norm", (("lipschitz/{layer}/act_grad_norm", "{layer}"),)),
        ("panels/hessian_top_eig", (("smoothness/hessian_top_eig", "λ_max"),)),
        ("panels/grad_curvature", (("smoothness/grad_curvature", "gᵀHg / ‖g‖²"),)),
        ("panels/hessian_top_k", tuple((f"hessian/eig_{i}", f"λ_{i}") for i in range(1, 11))),
        ("panels/hessian_trace", (("hessian/trace", "tr H"),)),
        (
            "panels/edge_of_stability",
            (
                ("hessian/precond_eig_max", "λ_max(P^-1/2 H P^-1/2)"),
                ("hessian/stability_threshold", "threshold (2/η SGD, 38/η Adam)"),
            ),
        ),
        ("panels/hessian_layer_trace", (("hessian/{layer}/trace", "{layer}"),)),
        ("panels/hessian_layer_eig", (("hessian/{layer}/eig_max", "{layer}"),)),
        ("panels/hessian_density", (("hessian/density/*", "density"),)),
    ]
    assert keys.prefixes()[:6] == (
        "budget/", "hessian/", "ics/", "lipschitz/", "noise/", "smoothness/"
    )  # fmt: skip


def test_plot_draws_the_declared_panel_of_a_csv_run(
    example: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv_logger = CSVLogger(tmp_path / "logs", name="run")
    pl.seed_everything(0, verbose=False)
    t = trainer([example.GradNormCallback(every_n_steps=2)], 5, logger=csv_logger)
    t.fit(Classifier(mlp().double()), loader())
    run_dir = Path(csv_logger.log_dir)
    logged = read_csv_log(run_dir / "metrics.csv")
    # the run logs no key of the built-in callbacks: plot reads it for the declared prefix alone
    assert any(k.startswith("gradnorm/") for k in logged)
    assert not any(k.startswith(("ics/", "lipschitz/", "smoothness/", "noise/")) for k in logged)

    out = tmp_path / "figures"
    assert main(["plot", str(run_dir), "--out", str(out)]) == 0
    assert (out / "gradnorm.png").is_file()
    index = (out / "index.md").read_text()
    assert "Norm of the loss gradient with respect to each parameter tensor." in index
    printed = capsys.readouterr().out
    assert "ics_l2.png skipped: no run logged ics/<layer>/l2 (ICSCallback)" in printed
    assert "gradnorm.png skipped" not in printed


def test_wandb_gets_the_declared_summary_and_chart(example: ModuleType, tmp_path: Path) -> None:
    with pytest.MonkeyPatch.context() as mp:
        _isolate_wandb(mp, tmp_path)
        if wandb.run is not None:
            wandb.finish()
        logger = WandbLogger(save_dir=tmp_path / "save", offline=True, project="lbn")
        pl.seed_everything(0, verbose=False)
        t = trainer([example.GradNormCallback(every_n_steps=2)], 5, logger=logger)
        t.fit(Classifier(mlp().double()), loader())
        wandb.finish()
        run = wait_for_finished_run(tmp_path / "save")
    key = "gradnorm/net.0.weight"
    records = [m for m in run.metrics if m.name == key.replace(".", "\\.")]
    assert records and records[-1].summary == {"max"}
    assert records[-1].step_metric == STEP_METRIC
    values = [v for _, v in run.values(key)]
    assert len(values) == 3 and run.summary[key] == {"max": max(values)}
    visualize = run.config["_wandb"]["visualize"]
    assert visualize["panels/gradnorm"]["panel_config"]["panelDefId"] == "wandb/lineseries/v0"
    assert len([r for r in run.history if "panels/gradnorm_table" in r]) == 1
