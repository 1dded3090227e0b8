"""The public API: every name in ``uda_sam.__all__`` resolves, is typed, and the plain-PyTorch part needs no Lightning."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

import uda_sam

PUBLIC = [name for name in uda_sam.__all__ if name != "__version__"]


def test_all_lists_every_export_and_the_type_checking_imports() -> None:
    assert sorted(PUBLIC) == sorted(uda_sam._EXPORTS)
    assert len(set(uda_sam.__all__)) == len(uda_sam.__all__)
    # The TYPE_CHECKING block (what type checkers see) names the same objects from the same modules.
    tree = ast.parse(Path(uda_sam.__file__).read_text())
    block = next(
        node for node in tree.body if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
    )
    imported = {alias.name: node.module for node in block.body for alias in node.names}
    assert imported == uda_sam._EXPORTS


@pytest.mark.parametrize("name", PUBLIC)
def test_name_resolves_to_its_module_object(name: str) -> None:
    value = getattr(uda_sam, name)
    module = sys.modules[uda_sam._EXPORTS[name]]
    assert value is getattr(module, name)
    assert name in dir(uda_sam)


def test_unknown_name() -> None:
    with pytest.raises(AttributeError, match="no attribute 'SAM'"):
        uda_sam.SAM  # noqa: B018


@pytest.mark.parametrize("name", [n for n in PUBLIC if callable(getattr(uda_sam, n))])
def test_public_callables_are_typed_and_documented(name: str) -> None:
    value = getattr(uda_sam, name)
    assert inspect.getdoc(value), f"{name} has no docstring"
    signature = inspect.signature(value.__init__ if inspect.isclass(value) else value)
    missing = [p.name for p in signature.parameters.values() if p.name != "self" and p.annotation is p.empty]
    assert not missing, f"{name}: parameters without a type annotation: {missing}"
    if not inspect.isclass(value):
        assert signature.return_annotation is not signature.empty, f"{name} has no return annotation"


def test_package_is_marked_typed() -> None:
    assert resources.files("uda_sam").joinpath("py.typed").is_file()


def test_plain_pytorch_api_does_not_import_lightning() -> None:
    code = (
        "import sys, uda_sam\n"
        "assert 'torch' not in sys.modules\n"
        "from uda_sam import (SelfAttentionModule, self_attention_loss, segmentation_loss, load_sam, save_sam,\n"
        "    DeepLabV2, FCN8s, ClasswiseThresholdEstimator, make_pseudo_labels, load_network_weights,\n"
        "    GTA5, Cityscapes, SegmentationMetrics, CLASS_NAMES)\n"
        "import uda_sam.pseudo_labels.generation, uda_sam.evaluation.scoring, uda_sam.cli.evaluate, uda_sam.data\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))\n"
        "assert not leaked, leaked\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(uda_sam.__file__).parents[1])


def test_only_the_package_root_resolves_names_on_first_use() -> None:
    """One lazy-import mechanism: the root's ``__getattr__``; every sub-package imports what it exports."""
    root = Path(uda_sam.__file__).parent
    lazy = sorted(
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if any(
            isinstance(node, ast.FunctionDef) and node.name == "__getattr__"
            for node in ast.parse(path.read_text()).body
        )
    )
    assert lazy == ["__init__.py"]
