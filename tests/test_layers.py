"""The package's import graph is the layer chain its docstring and the README state.

Floors, lowest first; a module imports modules of its own layer or of a lower floor, never a layer beside it:

- ``files``, ``checks``: helpers that import nothing of the package;
- ``data``, ``nn``: the two ground floors (readers and label tables; the SAM and the networks), apart;
- ``evaluation``, ``pseudo_labels``: scores and pseudo labels, over data and nn;
- ``media``: the W&B media the tasks and the callbacks share;
- ``tasks``, ``callbacks``, ``datamodules``: Lightning, apart;
- ``cli``: the command (it alone also reads the package root, for the version).

Every import counts, also those inside functions; only ``if TYPE_CHECKING:`` blocks are left out (they never run).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import uda_sam

PACKAGE = Path(uda_sam.__file__).parent

#: The layers, lowest floor first.
FLOORS: list[tuple[str, ...]] = [
    ("files", "checks"),
    ("data", "nn"),
    ("evaluation", "pseudo_labels"),
    ("media",),
    ("tasks", "callbacks", "datamodules"),
    ("cli",),
]
FLOOR = {layer: number for number, layer_names in enumerate(FLOORS) for layer in layer_names}

#: Layers that skip floors, reading only the named lower layers (stated beside the chain in the docstring and README).
READS_ONLY: dict[str, tuple[str, ...]] = {"datamodules": ("data",)}

#: The chain as the package docstring and the README write it (the helpers' floor is named apart).
CHAIN = " -> ".join(", ".join(names) for names in reversed(FLOORS[1:]))


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
    return parts[1] if len(parts) > 1 and parts[1] in FLOOR else None


def _layer_graph() -> dict[str, set[str]]:
    """``{layer: layers it imports}``, the package root counted as ``"uda_sam"``."""
    layers: dict[str, set[str]] = {layer: set() for layer in FLOOR}
    for module, imported in import_graph().items():
        layer = _layer(module)
        if layer is not None:
            layers[layer] |= {_layer(other) or other for other in imported} - {layer}
    return layers


def test_every_module_belongs_to_a_layer() -> None:
    outside = [m for m in import_graph() if _layer(m) is None and m not in ("uda_sam", "uda_sam.__main__")]
    assert not outside, f"modules outside every layer: {outside}"


def test_no_module_imports_a_higher_layer_or_one_beside_it() -> None:
    wrong = []
    for layer, imported in _layer_graph().items():
        for other in sorted(imported):
            if other == "uda_sam":
                if layer != "cli":  # the version string, read by the command
                    wrong.append(f"{layer} imports the package root")
            elif FLOOR[other] >= FLOOR[layer]:
                where = "above" if FLOOR[other] > FLOOR[layer] else "beside"
                culprits = sorted(
                    f"{m} imports {o}"
                    for m, ims in import_graph().items()
                    if _layer(m) == layer
                    for o in ims
                    if _layer(o) == other
                )
                wrong.append(f"{layer} imports {other}, a layer {where} it: {culprits}")
    assert not wrong, wrong


def test_every_floor_stands_on_the_one_below() -> None:
    """The chain is no looser than the graph: above the ground floors, each layer imports the floor under it, but
    for the layers that the docstring and the README say read only a lower floor (``READS_ONLY``)."""
    layers = _layer_graph()
    loose = [
        f"{layer} imports nothing of {FLOORS[FLOOR[layer] - 1]}"
        for layer in FLOOR
        if FLOOR[layer] >= 2 and layer not in READS_ONLY and not layers[layer] & set(FLOORS[FLOOR[layer] - 1])
    ]
    assert not loose, loose
    for layer, below in READS_ONLY.items():
        assert layers[layer] - {layer} <= set(below) | set(FLOORS[0]), (
            f"{layer} imports {sorted(layers[layer])}"
        )


def test_the_docstring_and_the_readme_state_the_chain() -> None:
    readme = (PACKAGE.parent / "README.md").read_text()
    for name, text in (("uda_sam.__doc__", uda_sam.__doc__ or ""), ("README.md", readme)):
        flat = re.sub(r"\s+", " ", text)
        assert f"`{CHAIN}`" in flat, f"{name} does not state the chain {CHAIN}"
        assert all(f"uda_sam.{helper}" in flat or f"{helper}.py" in flat for helper in FLOORS[0]), name
        assert "datamodules` reads only ``data``" in flat or "`datamodules` reads only `data`" in flat, name


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


def test_the_checker_sees_an_upward_import_a_sideways_one_and_a_circle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The rules above fail on a tree that breaks them."""
    real = import_graph()
    broken = {**real, "uda_sam.nn.sam": real["uda_sam.nn.sam"] | {"uda_sam.tasks.base"}}
    broken["uda_sam.data.gta5"] = real["uda_sam.data.gta5"] | {"uda_sam.nn.sam"}
    broken["uda_sam.cli.lightning"] = real["uda_sam.cli.lightning"] | {"uda_sam.cli.pipeline"}
    monkeypatch.setattr(sys.modules[__name__], "import_graph", lambda: broken)
    with pytest.raises(
        AssertionError, match=r"nn imports tasks, a layer above it: \['uda_sam.nn.sam imports"
    ):
        test_no_module_imports_a_higher_layer_or_one_beside_it()
    with pytest.raises(AssertionError, match=r"data imports nn, a layer beside it"):
        test_no_module_imports_a_higher_layer_or_one_beside_it()
    with pytest.raises(AssertionError, match="uda_sam.cli.pipeline"):
        test_no_import_circle()


def test_nothing_loose_at_the_root() -> None:
    loose = {p.stem for p in PACKAGE.glob("*.py")}
    assert loose == {"__init__", "__main__", "files", "checks", "media"}, sorted(loose)


def test_the_entry_point_is_the_one_in_pyproject() -> None:
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    assert 'uda-sam = "uda_sam.cli.entry_point:main"' in pyproject


def test_plain_layers_load_without_lightning() -> None:
    code = (
        "import sys\n"
        "import uda_sam.nn, uda_sam.nn.sam_io, uda_sam.pseudo_labels, uda_sam.pseudo_labels.generation\n"
        "import uda_sam.evaluation, uda_sam.evaluation.analysis, uda_sam.evaluation.scoring\n"
        "import uda_sam.data, uda_sam.data.gta5, uda_sam.data.cityscapes, uda_sam.data.synthia\n"
        "import uda_sam.data.image_folder, uda_sam.data.toy, uda_sam.files, uda_sam.checks, uda_sam.cli\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))\n"
        "assert not leaked, leaked\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)
