"""The package's tree shows its layers: nothing imports up, nothing imports in a circle, old paths still import.

Layers (an arrow: "may import"): ``cli -> tasks, callbacks, datamodules -> data, evaluation, pseudo_labels -> nn``, with the
shared helpers ``files`` and ``checks`` under them all and ``media`` beside the tasks and callbacks. Every import
counts, also those inside functions; only ``if TYPE_CHECKING:`` blocks are left out (they never run).
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import uda_sam

PACKAGE = Path(uda_sam.__file__).parent

#: Modules kept at their former paths for one release (aliases of the new ones): exempt from the layer rule.
OLD_PATHS = {
    "uda_sam.analysis": "uda_sam.evaluation.analysis",
    "uda_sam.generation": "uda_sam.pseudo_labels.generation",
    "uda_sam.metrics": "uda_sam.evaluation.metrics",
    "uda_sam.pipeline": "uda_sam.cli.pipeline",
    "uda_sam.pseudo_label_cli": "uda_sam.cli.pseudo_label",
    "uda_sam.sam_io": "uda_sam.nn.sam_io",
}

#: Rank of each layer: a module may import modules of its own rank or lower.
RANKS = {
    "files": 0,
    "checks": 0,
    "nn": 1,
    "data": 2,
    "evaluation": 2,
    "pseudo_labels": 2,
    "media": 3,
    "tasks": 3,
    "callbacks": 3,
    "datamodules": 3,
    "cli": 4,
}

#: Pairs of one rank that still must not import each other: (importer layer, imported layer).
FORBIDDEN = {
    ("callbacks", "tasks"),
    ("tasks", "callbacks"),
    ("datamodules", "tasks"),
    ("datamodules", "callbacks"),
    ("tasks", "datamodules"),
    ("callbacks", "datamodules"),
    ("data", "evaluation"),
    ("data", "pseudo_labels"),
}


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        names[name] = path
    return names


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:``."""
    nodes: list[ast.AST] = []
    pending = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            pending.extend(node.orelse)
            continue
        nodes.append(node)
        pending.extend(ast.iter_child_nodes(node))
    return nodes


def import_graph() -> dict[str, set[str]]:
    """``{module: package modules it imports}``; ``from pkg import sub`` counts as importing ``pkg.sub`` only."""
    modules = _module_names()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    source = node.module or ""
                submodules = {f"{source}.{alias.name}" for alias in node.names} & modules.keys()
                imported.update(submodules or {source})
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANKS else None


def test_no_module_imports_a_higher_layer() -> None:
    upward = []
    for module, imported in import_graph().items():
        layer = _layer(module)
        if layer is None or module in OLD_PATHS:
            continue  # the package root, __main__ and the deprecated aliases sit above every layer
        for other in imported:
            other_layer = _layer(other)
            assert other_layer is not None or other in OLD_PATHS or other == "uda_sam", other
            if other in OLD_PATHS:
                upward.append(f"{module} imports the deprecated {other}")
            elif other == "uda_sam":
                if layer != "cli":  # the version string, read by the command
                    upward.append(f"{module} imports the package root")
            elif RANKS[other_layer] > RANKS[layer] or (layer, other_layer) in FORBIDDEN:
                upward.append(f"{module} ({layer}) imports {other} ({other_layer})")
    assert not upward, upward


def test_no_import_circle() -> None:
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for other in sorted(graph[module]):
            if state.get(other) == 1:
                circles.append([*path[path.index(other) :], other])
            elif other not in state:
                visit(other, [*path, other])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, circles


def test_the_checker_sees_an_upward_import_and_a_circle(monkeypatch: pytest.MonkeyPatch) -> None:
    """The two rules above would fail on a tree that breaks them (today's former ``cli`` <-> ``pipeline``)."""
    real = import_graph()
    broken = {**real, "uda_sam.nn.sam": real["uda_sam.nn.sam"] | {"uda_sam.tasks.base"}}
    broken["uda_sam.cli.lightning"] = real["uda_sam.cli.lightning"] | {"uda_sam.cli.pipeline"}
    monkeypatch.setattr(sys.modules[__name__], "import_graph", lambda: broken)
    with pytest.raises(AssertionError, match=r"uda_sam.nn.sam \(nn\) imports uda_sam.tasks.base"):
        test_no_module_imports_a_higher_layer()
    with pytest.raises(AssertionError, match="uda_sam.cli.pipeline"):
        test_no_import_circle()


def test_nothing_loose_at_the_root() -> None:
    loose = sorted(p.stem for p in PACKAGE.glob("*.py"))
    allowed = {
        "__init__",
        "__main__",
        "files",
        "checks",
        "media",
        "evaluate",
        *(m.split(".")[1] for m in OLD_PATHS),
    }
    assert set(loose) <= allowed, sorted(set(loose) - allowed)


@pytest.mark.parametrize("old", sorted(OLD_PATHS))
def test_old_path_is_the_new_module(old: str) -> None:
    assert importlib.import_module(old) is importlib.import_module(OLD_PATHS[old])


def test_old_paths_of_the_pseudo_label_rule_and_the_scoring_import() -> None:
    from uda_sam.cli.evaluate import main, run_evaluate
    from uda_sam.evaluate import evaluate_folder as old_evaluate_folder
    from uda_sam.evaluate import main as old_main
    from uda_sam.evaluate import run_evaluate as old_run_evaluate
    from uda_sam.evaluation.scoring import evaluate_folder
    from uda_sam.pseudo_labels import ClasswiseThresholdEstimator, make_pseudo_labels, save_label_png
    from uda_sam.pseudo_labels.thresholds import ClasswiseThresholdEstimator as Estimator
    from uda_sam.pseudo_labels.thresholds import make_pseudo_labels as make
    from uda_sam.pseudo_labels.thresholds import save_label_png as save

    assert (old_evaluate_folder, old_main, old_run_evaluate) == (evaluate_folder, main, run_evaluate)
    assert (ClasswiseThresholdEstimator, make_pseudo_labels, save_label_png) == (Estimator, make, save)


def test_entry_point_and_the_cli_class_keep_their_paths() -> None:
    from uda_sam.cli import UDASamCLI, main
    from uda_sam.cli.entry_point import main as entry_point
    from uda_sam.cli.lightning import UDASamCLI as cli_class

    assert (UDASamCLI, main) == (cli_class, entry_point)
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    assert 'uda-sam = "uda_sam.cli:main"' in pyproject


def test_plain_layers_load_without_lightning() -> None:
    code = (
        "import sys\n"
        "import uda_sam.nn, uda_sam.nn.sam_io, uda_sam.pseudo_labels, uda_sam.pseudo_labels.generation\n"
        "import uda_sam.evaluation, uda_sam.evaluation.analysis, uda_sam.evaluation.scoring\n"
        "import uda_sam.data, uda_sam.data.gta5, uda_sam.data.cityscapes, uda_sam.data.synthia\n"
        "import uda_sam.data.image_folder\n"
        "import uda_sam.data.toy, uda_sam.files, uda_sam.checks\n"
        "import uda_sam.generation, uda_sam.sam_io, uda_sam.metrics, uda_sam.analysis\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))\n"
        "assert not leaked, leaked\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)
