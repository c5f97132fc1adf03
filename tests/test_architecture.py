"""The layering of docs/architecture.md, checked: what each part may import, and the worked example."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.support.models import Classifier, MemoryLogger, Recorder, fit, mlp

SRC = Path(__file__).resolve().parents[1] / "src" / "lightning_bn"
ROOT = Path(__file__).resolve().parents[1]

#: The plain-torch layer: importable without Lightning or W&B.
PLAIN_TORCH = [
    "lightning_bn",
    "lightning_bn.errors",
    "lightning_bn.layers",
    "lightning_bn.layers.convert",
    "lightning_bn.layers.selection",
    "lightning_bn.probe",
    "lightning_bn.probe.batched",
    "lightning_bn.diagnostics",
    "lightning_bn.diagnostics.paramvec",
    "lightning_bn.diagnostics.ics",
    "lightning_bn.diagnostics.landscape",
    "lightning_bn.diagnostics.hvp",
    "lightning_bn.diagnostics.eigen",
    "lightning_bn.diagnostics.curvature",
    "lightning_bn.diagnostics.bounds",
    "lightning_bn.noise",
    "lightning_bn.figures.draw",
]

# A fresh interpreter imports the module as a user would (the real package root runs first).
_PROBE = """
import importlib, sys
importlib.import_module({name!r})
bad = sorted(k for k in sys.modules if k.split(".")[0] in ("lightning", "pytorch_lightning", "wandb"))
print(",".join(bad))
"""


@pytest.mark.parametrize("name", PLAIN_TORCH)
def test_plain_torch_parts_import_neither_lightning_nor_wandb(name: str) -> None:
    code = _PROBE.format(name=name)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "", f"{name} imports {out.stdout.strip()}"


def _imports(path: Path) -> set[str]:
    """Every ``lightning_bn`` module ``path`` imports: at the top, inside functions and under
    ``TYPE_CHECKING`` alike (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lightning_bn"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith("lightning_bn"):
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if _module_path(sub) is not None else node.module)
    return found


def _module_path(name: str) -> Path | None:
    base = SRC.parent.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[name] = {m for m in _imports(path) if m != name}
    # the package root imports its public names on first use, from a table of module names
    root = importlib.util.find_spec("lightning_bn")
    assert root is not None
    graph["lightning_bn"] |= set(__import__("lightning_bn")._EXPORTS.values())
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_modules() -> None:
    """No module reaches itself through imports, lazy and type-only imports included."""
    assert _cycles(_graph()) == []


def _part(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def test_no_two_parts_import_each_other() -> None:
    """Between the top-level parts (``layers``, ``probe``, ``diagnostics``, ``callbacks``, ...),
    imports go one way only (the package root, which re-exports them, aside)."""
    parts: dict[str, set[str]] = {}
    for module, deps in _graph().items():
        if module == "lightning_bn":
            continue
        parts.setdefault(_part(module), set()).update(
            _part(d) for d in deps if d != "lightning_bn" and _part(d) != _part(module)
        )
    both = sorted(
        (a, b) for a, deps in parts.items() for b in deps if a < b and a in parts.get(b, set())
    )
    assert both == []


def _declaration_lines(path: Path) -> int:
    """Lines of the ``logged_keys = LoggedKeys(...)`` declaration in ``path`` (data, not wiring),
    with the blank and comment lines between it and the statement before it."""
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ClassDef):
            continue
        for before, stmt in zip(node.body, node.body[1:], strict=False):
            if isinstance(stmt, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "logged_keys" for t in stmt.targets
            ):
                assert stmt.end_lineno is not None and before.end_lineno is not None
                return stmt.end_lineno - before.end_lineno
    return 0


def test_callback_files_are_thin() -> None:
    """A callback file is its wiring (under 250 lines) plus the declaration of what it logs."""
    for path in sorted((SRC / "callbacks").glob("*.py")):
        if path.name in ("__init__.py", "base.py", "schedule.py"):  # wiring, plain logic
            continue
        n = len(path.read_text().splitlines()) - _declaration_lines(path)
        assert n < 250, f"{path.name} has {n} lines besides its declared keys"


def test_no_source_file_over_500_lines() -> None:
    """Outside the experiments and the reproduce runner, whose layout is their own."""
    long = [
        f"{path.relative_to(SRC)}: {n}"
        for path in sorted(SRC.rglob("*.py"))
        if path.relative_to(SRC).parts[0] not in ("reproduce", "experiments")
        and (n := len(path.read_text().splitlines())) > 500
    ]
    assert long == []


def test_callback_base_does_not_import_wandb_code() -> None:
    imports = [
        line
        for line in (SRC / "callbacks" / "base.py").read_text().splitlines()
        if line.lstrip().startswith(("import ", "from "))
    ]
    assert imports and not any("wandb" in line for line in imports)


@pytest.fixture
def forget_example() -> Iterator[None]:
    yield
    from lightning_bn.logging.keys import forget

    forget("GradNormCallback")  # its declaration goes with the test that defined it


def _load_example() -> object:
    spec = importlib.util.spec_from_file_location(
        "new_diagnostic", ROOT / "examples" / "new_diagnostic.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_worked_example_matches_autograd_brute_force(forget_example: None) -> None:
    """The doc's example callback logs ‖∇_{W_i} L‖ at W^t equal to a deep-copy autograd pass."""
    example = _load_example()
    recorder, logger = Recorder(), MemoryLogger()
    make = lambda: Classifier(mlp(dropout=0.3)).double()  # noqa: E731
    fit(make, [recorder, example.GradNormCallback(every_n_steps=2)], steps=5, logger=logger)
    measured = [s for s in recorder.steps if s["step"] % 2 == 0]
    assert [s["step"] for s in measured] == [0, 2, 4]
    for s in measured:
        ref = make()
        ref.load_state_dict(s["before"])
        ref.train()
        with torch.random.fork_rng():
            torch.set_rng_state(s["rng"])
            loss = nn.functional.cross_entropy(ref(s["batch"][0]), s["batch"][1])
        grads = torch.autograd.grad(loss, list(ref.parameters()))
        logged = logger.history[s["step"]]
        for (name, _), g in zip(ref.named_parameters(), grads, strict=True):
            assert logged[f"gradnorm/{name}"] == pytest.approx(float(g.norm()), rel=1e-9, abs=1e-12)


def test_moved_modules_keep_their_old_paths_with_a_deprecation_warning() -> None:
    """Each alias of ``_deprecated`` imports, warns naming the removal version, and forwards."""
    from lightning_bn import _deprecated

    code = (
        "import importlib, warnings\n"
        "from lightning_bn._deprecated import MOVED_MODULES\n"
        "for old, new in MOVED_MODULES.items():\n"
        "    with warnings.catch_warnings(record=True) as seen:\n"
        "        warnings.simplefilter('always')\n"
        "        alias = importlib.import_module(old)\n"
        "    target = importlib.import_module(new)\n"
        "    assert any(issubclass(w.category, DeprecationWarning) and '0.3.0' in str(w.message)\n"
        "               and new in str(w.message) for w in seen), (old, seen)\n"
        "    public = getattr(target, '__all__', [n for n in dir(target) if not n.startswith('_')])\n"
        "    for name in public:\n"
        "        assert getattr(alias, name) == getattr(target, name), (old, name)\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "ok"
    assert _deprecated.REMOVED_IN == "0.3.0"


def test_moved_names_warn_and_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_bn.reproduce.figures as reproduce_figures

    monkeypatch.delitem(sys.modules, "lightning_bn.plotting", raising=False)  # import it afresh
    with pytest.warns(
        DeprecationWarning, match=r"`lightning_bn\.plotting`.*0\.3\.0.*figures\.draw"
    ):
        import lightning_bn.plotting as plotting  # type: ignore[import-not-found]
    with pytest.warns(
        DeprecationWarning, match=r"plotting\.plot_run`.*0\.3\.0.*reproduce\.figures"
    ):
        plot_run = plotting.plot_run
    assert plot_run is reproduce_figures.plot_run


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("lightning_bn.logging.wandb", "PAPER_SUMMARIES"),
        ("lightning_bn.logging.wandb", "PAPER_PANELS"),
        ("lightning_bn.logging.panels", "PAPER_PANELS"),
    ],
)
def test_tables_of_the_builtin_callbacks_moved_to_callbacks(module: str, name: str) -> None:
    import importlib

    import lightning_bn.callbacks as callbacks

    with pytest.warns(DeprecationWarning, match=rf"{module}\.{name}.*0\.3\.0"):
        value = getattr(importlib.import_module(module), name)
    assert value == getattr(callbacks, name)


def test_docs_show_the_worked_example_as_it_is() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    block = doc.split("```python\n")[1].split("```")[0]
    example = (ROOT / "examples" / "new_diagnostic.py").read_text()
    assert block.strip() == example[example.index("import lightning.pytorch") :].strip()
