"""Every shipped config resolves, through `uda-sam fit --print_config`, to the values recorded in
``tests/data/resolved_configs.json``: how the files are laid out (``_base_`` files, short rows) changes no value.

After a deliberate change of a shipped config's values, rewrite the record from the repository root with
``python tests/test_resolved_configs.py`` and review its diff.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "data" / "resolved_configs.json"
FRAGMENTS = ("init", "trainer", "logger")  # configs added to a row with a second --config
ROWS = sorted(
    p.relative_to(REPO).as_posix()
    for p in (REPO / "configs").rglob("*.yaml")
    if p.name != "pipeline.yaml"
    and "_base_" not in p.relative_to(REPO).parts
    and p.relative_to(REPO / "configs").parts[0] not in FRAGMENTS
)
#: The fragments, each with a row as the README combines them.
COMPOSED = [
    ("configs/gta5/ours_8_10.yaml", "configs/init/deeplab_caffe.yaml"),
    ("configs/fcn8s/gta5/no_pseudo.yaml", "configs/init/fcn8s_caffe.yaml"),
    ("configs/fcn8s/synthia/ours_8_10.yaml", "configs/init/fcn8s_caffe.yaml"),
    ("configs/gta5/ours_8_10.yaml", "configs/trainer/ddp.yaml"),
    ("configs/synthia/no_pseudo.yaml", "configs/logger/wandb.yaml"),
    ("configs/toy/ours.yaml", "configs/logger/wandb.yaml"),
]
CASES = [(row,) for row in ROWS] + COMPOSED


def case_id(case: tuple[str, ...]) -> str:
    return "+".join(case)


def resolve(files: tuple[str, ...]) -> dict[str, Any]:
    """The config `uda-sam fit --config FILE ...` runs with, as `--print_config` prints it (from the repository
    root, where the configs' relative paths point)."""
    from uda_sam.cli.entry_point import main

    args = ["fit"] + [a for file in files for a in ("--config", file)] + ["--print_config"]
    out, err = io.StringIO(), io.StringIO()
    before = Path.cwd()
    os.chdir(REPO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(args)
            except SystemExit as exit_info:
                assert exit_info.code in (0, None), err.getvalue()[-2000:]
    finally:
        os.chdir(before)
    return yaml.safe_load(out.getvalue())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_config_resolves_to_recorded_values(case: tuple[str, ...]) -> None:
    recorded = json.loads(FIXTURE.read_text())
    assert case_id(case) in recorded, f"{case_id(case)}: no recorded values; see this module's docstring"
    assert resolve(case) == recorded[case_id(case)]


def test_every_recorded_config_is_still_shipped() -> None:
    assert sorted(json.loads(FIXTURE.read_text())) == sorted(case_id(case) for case in CASES)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    FIXTURE.write_text(json.dumps({case_id(c): resolve(c) for c in CASES}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE} ({len(CASES)} configs)")
