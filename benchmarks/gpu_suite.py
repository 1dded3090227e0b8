"""Every GPU figure of the benchmarks and the CUDA checks, in one run that cannot overrun its budget.

Usage (from the repository root; no install needed, the source tree is put on ``PYTHONPATH``)::

    ${PYTHON:-python3} benchmarks/gpu_suite.py                          # budget 420 s, files in benchmarks/results/
    ${PYTHON:-python3} benchmarks/gpu_suite.py --budget 300 --out-dir /tmp/suite --export "$OUT"
    ${PYTHON:-python3} benchmarks/gpu_suite.py --smoke --out-dir /tmp/smoke    # the same flow on the CPU, tiny sizes

The steps, in order of value: the SAM kernels (``sam.py``); the training step at 1024x512, plain PyTorch vs
Lightning, fp32 vs bf16, with and without the SAM (``train_step.py``); a profile of the plain loop's step in bf16
and fp32, NCHW and channels_last (``train_step.py --profile``: the evidence for the bf16 floor); a pseudo-label
generation vs plain inference (``generation.py``); the steps of the paper's GTA5 protocol with 1280x720 sources; a
2048x1024 step with the SAM; the CUDA checks (``pytest -m cuda``).

Each step runs in its own process with a time box: the script measures until its step counts or its box, whichever
comes first, and writes what it has. The process is killed ``GRACE_S`` seconds after its box (a hung kernel cannot
eat the budget), and a step starts only if its box and that grace fit in what is left of ``--budget``. Each step
writes ``<name>.md`` / ``.json`` and a log into ``<out-dir>/gpu_<machine>/`` the moment it ends and prints one line;
after every step the suite rewrites the summary ``<out-dir>/gpu_<machine>.md`` / ``.json`` (machine, versions, each
step's status, the floors as PASS / FAIL / not measured, the projected wall time of the paper's protocol) and one
archive ``gpu_<machine>.tar.gz`` of them all (a step's folder of further files too, such as the profile tables of
``train_profile``), and copies those three files to ``--export``. A run cut off from outside therefore still leaves
every step that ended. ``--smoke`` writes ``gpu_smoke_<machine>.*`` instead.

Before anything else the suite checks that each package the steps need can be found (nothing is imported), and stops
in its first second with one line naming those missing; of them it uses only PyYAML itself (to read the pipeline
configs for the projection).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from machine import host_info  # benchmarks/machine.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"

#: Import name -> distribution, for every package the steps import.
REQUIRED = {
    "torch": "torch",
    "lightning": "lightning",
    "torchvision": "torchvision",
    "torchmetrics": "torchmetrics",
    "numpy": "numpy",
    "albumentations": "albumentations",
    "jsonargparse": "jsonargparse",
    "cv2": "opencv-python-headless",
    "PIL": "pillow",
    "yaml": "pyyaml",
}
#: Seconds between a step's time box and the kill of its process (start-up, writing, one step past the box).
GRACE_S = 10.0
SMOKE_GRACE_S = 15.0
#: In a step's arguments: its folder of files (``<out-dir>/gpu_<machine>/``), for files beyond ``<name>.*``.
STEPS_DIR = "{steps_dir}"
#: Seconds of the budget kept for the final summary and archive.
RESERVE_S = 5.0
DEFAULT_BUDGET_S = 420.0
#: Cityscapes training images: one pseudo-label pass of the projection.
CITYSCAPES_TRAIN_IMAGES = 2975


# --------------------------------------------------------------------------------------------------- steps
@dataclass(frozen=True)
class Step:
    """One step of the suite: a command with its time box, on a GPU and in the ``--smoke`` rehearsal."""

    name: str
    title: str
    box_s: float
    smoke_box_s: float
    args: tuple[str, ...]
    smoke_args: tuple[str, ...]
    script: str | None = None  # a benchmarks/ script; None: the CUDA checks (pytest)
    min_box_s: float = 0.0  # on a GPU, the least box it is given when the budget cannot hold every full box
    # A folder of further files it writes into the steps' folder (archived with them).
    folder: str | None = None

    def box(self, smoke: bool) -> float:
        return self.smoke_box_s if smoke else self.box_s


# --smoke: DeepLabV2-ResNet18 at tiny sizes in fp32 (bf16 autocast on a CPU without bf16 units costs ~1 s a step).
_TRAIN_TINY = ("--device", "cpu", "--backbone", "resnet18", "--warmup", "1", "--steps", "2")
STEPS: tuple[Step, ...] = (
    Step(
        "sam",
        "SAM kernels: blockwise vs full, N = 1024 ... 32768, forward + backward",
        30,
        20,
        ("--device", "cuda"),
        ("--device", "cpu", "--sizes", "256", "1024", "--in-process", "--warmup", "1", "--repeats", "2"),
        script="sam.py",
        min_box_s=15,
    ),
    Step(
        "train_step",
        "training step at 1024x512: plain vs Lightning, fp32 vs bf16, with and without the SAM",
        95,
        30,
        (
            "--device",
            "cuda",
            "--warmup",
            "3",
            "--steps",
            "30",
            "--variants",
            "plain-fp32",
            "lightning-fp32",
            "plain-bf16",
            "lightning-bf16",
            "lightning-bf16-nosam",
        ),  # fmt: skip
        (*_TRAIN_TINY, "--size", "64", "32", "--variants", "plain-fp32", "lightning-fp32"),
        script="train_step.py",
        min_box_s=90,
    ),
    # The evidence for the bf16 floor: where the plain loop's step spends its time. The bf16 variants come first
    # (the step that fails to be faster, then its NHWC form); each variant pays cuDNN's algorithm search once.
    Step(
        "train_profile",
        "training step profile at 1024x512: plain loop, bf16 and fp32, NCHW and channels_last (torch.profiler)",
        45,
        25,
        (
            "--device",
            "cuda",
            "--warmup",
            "2",
            "--steps",
            "8",
            "--variants",
            "plain-bf16",
            "plain-bf16-cl",
            "plain-fp32",
            "plain-fp32-cl",
            "--profile",
            f"{STEPS_DIR}/train_profile",
        ),  # fmt: skip
        (
            *_TRAIN_TINY,
            "--size",
            "64",
            "32",
            "--variants",
            "plain-fp32",
            "plain-fp32-cl",
            "--profile",
            f"{STEPS_DIR}/train_profile",
        ),  # fmt: skip
        script="train_step.py",
        min_box_s=25,
        folder="train_profile",
    ),
    Step(
        "generation",
        "pseudo-label generation vs plain inference: DeepLabV2-ResNet101, 1024x512, bf16",
        70,
        30,
        (
            "--device",
            "cuda",
            "--backbone",
            "resnet101",
            "--size",
            "1024",
            "512",
            "--batch-size",
            "8",
            "--precision",
            "bf16",
            "--num-workers",
            "8",
            "--image-counts",
            "64",
            "256",
        ),  # fmt: skip
        (
            "--device",
            "cpu",
            "--backbone",
            "resnet18",
            "--size",
            "64",
            "32",
            "--batch-size",
            "2",
            "--num-workers",
            "0",
            "--image-counts",
            "4",
        ),  # fmt: skip
        script="generation.py",
        min_box_s=45,
    ),
    Step(
        "source_step",
        "the GTA5 protocol's steps with 1280x720 sources (1024x512 targets), Lightning bf16",
        45,
        30,
        (
            "--device",
            "cuda",
            "--source-size",
            "1280",
            "720",
            "--warmup",
            "3",
            "--steps",
            "20",
            "--variants",
            "lightning-bf16-stage0",
            "lightning-bf16-stage1",
            "lightning-bf16",
            "lightning-bf16-nosam",
        ),  # fmt: skip
        (
            *_TRAIN_TINY,
            "--size",
            "64",
            "32",
            "--source-size",
            "80",
            "48",
            "--variants",
            "lightning-fp32-stage0",
            "lightning-fp32",
        ),  # fmt: skip
        script="train_step.py",
        min_box_s=35,
    ),
    Step(
        "large_step",
        "a 2048x1024 step with the SAM (N = 32768)",
        45,
        30,
        (
            "--device",
            "cuda",
            "--size",
            "2048",
            "1024",
            "--warmup",
            "3",
            "--steps",
            "10",
            "--variants",
            "lightning-bf16",
            "plain-bf16",
        ),  # fmt: skip
        (*_TRAIN_TINY, "--size", "96", "48", "--variants", "lightning-fp32"),
        script="train_step.py",
        min_box_s=30,
    ),
    Step(
        "cuda_checks",
        "CUDA checks: pytest -m cuda (SAM kernels, bf16 self-training, pseudo labels, metrics, the toy CLI)",
        60,
        40,
        (),
        (),
        min_box_s=35,
    ),
)
STEP_NAMES = tuple(step.name for step in STEPS)


def fit_boxes(steps: list[Step], budget: float, smoke: bool) -> dict[str, float]:
    """Each step's box, so that every chosen step gets its share of ``budget``.

    When the full boxes, each step's grace and :data:`RESERVE_S` fit in ``budget``, they are kept. Otherwise (on a
    GPU only) every box gives up the same fraction of what lies above its :attr:`Step.min_box_s`, as much as needed;
    when even the least boxes do not fit, they are used and the last steps are skipped as the budget runs out.
    """
    boxes = {s.name: s.box(smoke) for s in steps}
    grace = SMOKE_GRACE_S if smoke else GRACE_S
    room = budget - RESERVE_S - grace * len(steps)
    if smoke or sum(boxes.values()) <= room:
        return boxes
    least = {s.name: min(s.min_box_s, s.box_s) for s in steps}
    spare = sum(boxes.values()) - sum(least.values())
    kept = min(max((room - sum(least.values())) / spare, 0.0), 1.0) if spare > 0 else 0.0
    return {name: round(least[name] + kept * (boxes[name] - least[name]), 1) for name in boxes}


@dataclass
class StepRecord:
    """What the suite knows about one step after it ended (or was skipped)."""

    name: str
    title: str
    status: str = "not started"
    box_s: float | None = None
    wall_s: float | None = None
    headline: str = ""
    files: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- arguments
def positive_seconds(text: str) -> float:
    """``--budget`` value: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, e.g. 420; got {text!r}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gpu_suite.py",
        description=__doc__.split("\n", 1)[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--budget",
        type=positive_seconds,
        help=f"seconds for the whole run (default {DEFAULT_BUDGET_S:.0f}; with --smoke, what its steps need)",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=BENCHMARKS / "results",
        help="where the summary, the archive and the steps' folder go (default benchmarks/results)",
    )
    parser.add_argument(
        "--export", type=Path, help="also copy the summary (.md, .json) and the archive here after every step"
    )
    parser.add_argument("--smoke", action="store_true", help="rehearse every step on the CPU at tiny sizes")
    parser.add_argument(
        "--steps",
        nargs="+",
        choices=STEP_NAMES,
        metavar="STEP",
        help=f"run only these of {', '.join(STEP_NAMES)}",
    )
    args = parser.parse_args(argv)
    for option, path in (("--out-dir", args.out_dir), ("--export", args.export)):
        if path is not None and path.exists() and not path.is_dir():
            parser.error(f"{option}: {path} is a file; expected a folder (it is created when missing)")
    if args.budget is None:
        grace = SMOKE_GRACE_S if args.smoke else GRACE_S
        args.budget = sum(s.box(True) + grace for s in STEPS) + RESERVE_S if args.smoke else DEFAULT_BUDGET_S
    args.argv = argv
    return args


def missing_packages() -> list[str]:
    """Distributions of :data:`REQUIRED` that cannot be found (nothing is imported)."""
    return [dist for name, dist in REQUIRED.items() if importlib.util.find_spec(name) is None]


# ------------------------------------------------------------------------------------------------- running
def step_command(step: Step, smoke: bool, steps_dir: Path, tmp_dir: Path, box_s: float) -> list[str]:
    """The command line of ``step``."""
    if step.script is None:
        return [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-o", "addopts=", "-p", "no:cacheprovider",
                "--basetemp", str(tmp_dir / "pytest"), "--junitxml", str(steps_dir / f"{step.name}.xml"),
                "tests/test_cuda.py", "tests/test_metrics.py"]  # fmt: skip
    args = [arg.replace(STEPS_DIR, str(steps_dir)) for arg in (step.smoke_args if smoke else step.args)]
    return [sys.executable, str(BENCHMARKS / step.script), *args,
            "--out-dir", str(steps_dir), "--stem", step.name, "--time-box", f"{box_s:g}"]  # fmt: skip


def step_environment(smoke: bool) -> dict[str, str]:
    """The suite's environment with the source tree importable and W&B off (it may not be installed).

    ``--smoke`` steps use one thread unless ``OMP_NUM_THREADS`` says otherwise: tiny sizes gain nothing from more.
    """
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    if smoke:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_process(
    command: list[str], log: Path, limit_s: float, env: dict[str, str] | None = None
) -> int | None:
    """Run ``command`` into ``log``; its exit status, or ``None`` when it was killed at ``limit_s`` seconds."""
    with log.open("w") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the step's own process group: its workers go too
            process.wait()
            return None


def last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pytest_results(xml: Path, out: Path, log: Path) -> str:
    """Summarise pytest's JUnit XML into ``out`` (.json and .md); returns the headline."""
    try:
        cases = ET.parse(xml).getroot().iter("testcase")
    except (OSError, ET.ParseError):
        cases = iter(())
    outcomes: dict[str, str] = {}
    for case in cases:
        name = f"{case.get('classname', '')}::{case.get('name', '')}".lstrip(":")
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[name] = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(
            kinds[0] if kinds else "", "passed"
        )
    counts = {
        kind: sum(v == kind for v in outcomes.values()) for kind in ("passed", "failed", "error", "skipped")
    }
    headline = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n) or f"no result ({last_line(log)})"
    record = {"tests": outcomes, "counts": counts, "headline": headline}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    rows = [f"| `{name}` | {outcome} |" for name, outcome in outcomes.items()]
    out.with_suffix(".md").write_text(
        "\n".join(
            ["# CUDA checks (`pytest -m cuda`)", "", headline, "", "| test | outcome |", "|---|---|", *rows]
        )
        + "\n"
    )
    return headline


def run_step(step: Step, smoke: bool, steps_dir: Path, tmp_dir: Path, box_s: float) -> StepRecord:
    """Run one step with the time box ``box_s`` under its hard limit and read back what it wrote."""
    grace = SMOKE_GRACE_S if smoke else GRACE_S
    record = StepRecord(step.name, step.title, box_s=box_s)
    log = steps_dir / f"{step.name}.log"
    if step.script is None and importlib.util.find_spec("pytest") is None:
        record.status = "not run: pytest missing"
        return record
    began = time.monotonic()
    command = step_command(step, smoke, steps_dir, tmp_dir, box_s)
    code = run_process(command, log, box_s + grace, step_environment(smoke))
    record.wall_s = round(time.monotonic() - began, 1)
    if step.script is None:
        record.headline = pytest_results(steps_dir / f"{step.name}.xml", steps_dir / step.name, log)
        record.status = {None: "killed at its hard limit", 0: "ok"}.get(code, f"failed (exit {code})")
    else:
        written = read_json(steps_dir / f"{step.name}.json") or {}
        record.headline = written.get("headline") or last_line(log)
        record.status = step_status(code, written)
    record.files = sorted(p.name for p in steps_dir.glob(f"{step.name}.*"))
    if step.folder is not None:
        record.files += sorted(
            f"{step.folder}/{p.name}" for p in (steps_dir / step.folder).glob("*") if p.is_file()
        )
    return record


def step_status(code: int | None, written: dict[str, Any]) -> str:
    """``ok``, ``ok, cut by its time box``, ``killed ...`` or ``failed ...`` from the exit code and the results file."""
    if code is None:
        kept = "its results so far kept" if written else "no results file"
        return f"killed at its hard limit ({kept})"
    if code != 0:
        return f"failed (exit {code})"
    if not written:
        return "failed (no results file)"
    return "ok, cut by its time box" if (written.get("time_box") or {}).get("reached") else "ok"


# -------------------------------------------------------------------------------------------------- floors
def variant(record: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    """A measured variant of a ``train_step.py`` record (``None`` when absent or failed)."""
    found = (record or {}).get("variants", {}).get(name)
    return found if found and found.get("error") is None else None


def floor(name: str, passed: bool | None, figures: str) -> dict[str, str]:
    verdict = "not measured" if passed is None else ("PASS" if passed else "FAIL")
    return {"floor": name, "verdict": verdict, "figures": figures}


def size_text(record: dict[str, Any]) -> str:
    (wt, ht), (ws, hs) = record["size"], record["source_size"]
    return f"{wt}x{ht}" if (wt, ht) == (ws, hs) else f"source {ws}x{hs}, target {wt}x{ht}"


def lightning_floors(train: dict[str, Any] | None) -> list[dict[str, str]]:
    """Lightning step <= 1.05x the plain loop at the same precision (ms/iteration)."""
    rows = []
    for precision in ("fp32", "bf16"):
        name = f"Lightning step <= 1.05x the plain loop ({precision})"
        plain, light = variant(train, f"plain-{precision}"), variant(train, f"lightning-{precision}")
        if train is None or plain is None or light is None:
            rows.append(floor(name, None, "needs plain and lightning variants of the train_step step"))
            continue
        ratio = light["iteration_ms"] / plain["iteration_ms"]
        rows.append(floor(name, ratio <= 1.05, f"{light['iteration_ms']:.1f} vs {plain['iteration_ms']:.1f} "
                                               f"ms/iteration = x{ratio:.3f} ({size_text(train)})"))  # fmt: skip
    return rows


def bf16_floor(train: dict[str, Any] | None, profile: dict[str, Any] | None = None) -> dict[str, str]:
    """The bf16 step (Lightning) <= 0.72x the fp32 plain-loop step; the train_profile step's figures beside it."""
    name = "bf16 step <= 0.72x the fp32 plain step"
    bf16, fp32 = variant(train, "lightning-bf16"), variant(train, "plain-fp32")
    evidence = profile_evidence(profile)
    if train is None or bf16 is None or fp32 is None:
        return floor(name, None, "needs lightning-bf16 and plain-fp32 of the train_step step" + evidence)
    ratio = bf16["iteration_ms"] / fp32["iteration_ms"]
    return floor(name, ratio <= 0.72, f"lightning-bf16 {bf16['iteration_ms']:.1f} / plain-fp32 "
                                      f"{fp32['iteration_ms']:.1f} ms/iteration = x{ratio:.3f} ({size_text(train)})"
                                      + evidence)  # fmt: skip


#: The variants of the train_profile step, in the order its figures are quoted.
PROFILE_VARIANTS = ("plain-fp32", "plain-bf16", "plain-fp32-cl", "plain-bf16-cl")


def percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f} %"


def profile_evidence(profile: dict[str, Any] | None) -> str:
    """The train_profile step's figures quoted with the bf16 floor ('' without them): the plain loop's
    ms/iteration in NCHW and channels_last, bf16 / fp32 in each, and each profile's conv and layout/copy shares."""
    measured = {n: v for n in PROFILE_VARIANTS if (v := variant(profile, n))}
    if not measured:
        return ""
    times = ", ".join(f"{n} {v['iteration_ms']:.1f}" for n, v in measured.items())
    ratios = [
        f"bf16/fp32 {label} x{measured[f'plain-bf16{suffix}']['iteration_ms'] / measured[f'plain-fp32{suffix}']['iteration_ms']:.3f}"
        for suffix, label in (("", "NCHW"), ("-cl", "channels_last"))
        if f"plain-bf16{suffix}" in measured and f"plain-fp32{suffix}" in measured
    ]  # fmt: skip
    shares = ", ".join(
        f"{n} {percent(v['profile']['conv_share'])} / {percent(v['profile']['layout_share'])}"
        for n, v in measured.items()
        if v.get("profile")
    )
    text = f"; train_profile, plain loop, ms/iteration: {times}"
    text += f" ({'; '.join(ratios)})" if ratios else ""
    return text + (f"; profile, conv / layout-copy share of busy time: {shares}" if shares else "")


def sam_share_floor(train: dict[str, Any] | None) -> dict[str, str]:
    """The SAM loss <= 3 % of the bf16 step at 1024x512: (with - without) / with, Lightning, ms/iteration."""
    name = "SAM loss <= 3 % of the bf16 step at 1024x512"
    with_sam, without = variant(train, "lightning-bf16"), variant(train, "lightning-bf16-nosam")
    if train is None or with_sam is None or without is None:
        return floor(name, None, "needs lightning-bf16 and lightning-bf16-nosam of the train_step step")
    share = (with_sam["iteration_ms"] - without["iteration_ms"]) / with_sam["iteration_ms"]
    return floor(name, share <= 0.03, f"{100 * share:.1f} % ({with_sam['iteration_ms']:.1f} with vs "
                                      f"{without['iteration_ms']:.1f} ms/iteration without; {size_text(train)})")  # fmt: skip


def large_step_floor(large: dict[str, Any] | None) -> dict[str, str]:
    """A step with the SAM at the large size runs (no out-of-memory); its peak memory."""
    name = "a 2048x1024 step with the SAM fits"
    runs = {
        n: v for n, v in (large or {}).get("variants", {}).items() if "nosam" not in n and "stage" not in n
    }
    measured = {n: v for n, v in runs.items() if v.get("error") is None}
    oom = [n for n, v in runs.items() if "out of memory" in (v.get("error") or "")]
    if large is None or not (measured or oom):
        return floor(name, None, "needs the large_step step")
    peaks = ", ".join(f"{n} {v['iteration_ms']:.1f} ms/iteration, peak "
                      + (f"{v['peak_mib']:.0f} MiB" if v["peak_mib"] is not None else "GPU memory n/a")
                      for n, v in measured.items())  # fmt: skip
    text = "; ".join(filter(None, [peaks, f"out of memory: {', '.join(oom)}" if oom else ""]))
    return floor(name, not oom, f"{text} ({size_text(large)}, SAM {large.get('sam_impl', '?')})")


def generation_floor(gen: dict[str, Any] | None) -> dict[str, str]:
    """Generation >= 0.90x plain inference at the largest set, host memory growth < 1 GiB at every set."""
    name = "generation >= 0.90x plain inference, host memory growth < 1 GiB"
    rows = [r for r in (gen or {}).get("rows", []) if "error" not in r]
    if not rows:
        return floor(name, None, "needs the generation step")
    top = max(rows, key=lambda r: r["images"])
    ratio = top["generation"] / top["plain"]
    # The generation's own growth where the step measured it (plain inference's beside it), else both loops'.
    own = all(r.get("generation_peak_growth_mib") is not None for r in rows)
    growth = max(r["generation_peak_growth_mib" if own else "rss_growth_mib"] for r in rows)
    plain = (f"; plain inference's own up to {max(r.get('plain_peak_growth_mib') or 0 for r in rows):.0f} MiB"
             if own else "")  # fmt: skip
    figures = (f"{top['generation']:.1f} vs {top['plain']:.1f} img/s = x{ratio:.2f} at {top['images']} images; "
               f"{'the generation' + chr(39) + 's own ' if own else ''}growth up to {growth:.0f} MiB{plain} "
               f"(sizes {', '.join(str(r['images']) for r in rows)})")  # fmt: skip
    return floor(name, ratio >= 0.90 and growth < 1024, figures)


def sam_floors(sam: dict[str, Any] | None) -> list[dict[str, str]]:
    """The targets ``sam.py`` judged itself (``PASS: ...`` / ``FAIL: ...`` lines), one row each."""
    rows = []
    for line in (sam or {}).get("targets", []):
        verdict, _, text = line.partition(": ")
        rows.append({"floor": f"SAM kernel: {text}", "verdict": verdict, "figures": "sam step"})
    return rows or [floor("SAM kernels: the targets of sam.py", None, "needs the sam step at its GPU sizes")]


# ---------------------------------------------------------------------------------------------- projection
def config_value(files: list[Path], keys: tuple[str, ...]) -> Any:
    """The value at ``keys`` in the last of ``files`` (YAML, with their ``_base_`` files) that sets it."""
    from uda_sam.cli.config_files import load_config

    found = None
    for path in files:
        node: Any = load_config(path)
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        found = found if node is None else node
    return found


def protocol(pipeline: Path = REPO / "configs" / "gta5" / "pipeline.yaml") -> dict[str, Any]:
    """Stages, steps and pseudo-label passes of a pipeline file (what ``uda-sam pipeline`` runs)."""
    import yaml

    spec = yaml.safe_load(pipeline.read_text())

    def files(stage: dict[str, Any]) -> list[Path]:
        config = stage["config"]
        return [REPO / c for c in ([config] if isinstance(config, str) else config)]

    def steps(stage: dict[str, Any]) -> int:
        return int(config_value(files(stage), ("trainer", "max_steps")))

    settings = []
    for setting in spec["settings"]:
        # A trained SAM is needed by a self-attention loss whose `sam` is a file (not No Conv's inline module).
        loss = config_value(files(setting), ("model", "init_args", "self_attention")) or {}
        uses_sam = bool(loss) and not isinstance(loss.get("init_args", {}).get("sam"), dict)
        settings.append({"name": setting["name"], "steps": steps(setting), "uses_sam": uses_sam,
                         "generations": int(setting.get("generations") or spec["generations"])})  # fmt: skip
    return {
        "file": str(pipeline.relative_to(REPO)),
        "stage0_steps": steps(spec["no_pseudo"]),
        "stage1_steps": steps(spec["sam_pretraining"]),
        "settings": settings,
    }


def projected_seconds(
    spec: dict[str, Any], settings: list[dict[str, Any]], t: dict[str, Any], rate: float
) -> dict[str, Any]:
    """Seconds of training and of pseudo-label passes for the stages 0, 1 and ``settings``' generations.

    ``t``: ms/iteration of ``stage0``, ``stage1``, ``sam`` (self-training with the SAM loss) and ``nosam``;
    ``rate``: generation images/s. Generation 1's labels are made once (from stage 0); each later generation of each
    setting needs one pass of the previous generation's network.
    """
    train = spec["stage0_steps"] * t["stage0"] + spec["stage1_steps"] * t["stage1"]
    train += sum(s["generations"] * s["steps"] * t["sam" if s["uses_sam"] else "nosam"] for s in settings)
    passes = 1 + sum(s["generations"] - 1 for s in settings)
    return {
        "train_s": train / 1000,
        "label_passes": passes,
        "labels_s": passes * CITYSCAPES_TRAIN_IMAGES / rate,
    }


def projection(source: dict[str, Any] | None, gen: dict[str, Any] | None) -> dict[str, Any]:
    """Projected wall time of the GTA5 protocol on one GPU and on 8, from the source_step and generation steps."""
    names = {"stage0": "lightning-bf16-stage0", "stage1": "lightning-bf16-stage1", "sam": "lightning-bf16",
             "nosam": "lightning-bf16-nosam"}  # fmt: skip
    t = {key: (variant(source, name) or {}).get("iteration_ms") for key, name in names.items()}
    rows = [r for r in (gen or {}).get("rows", []) if "error" not in r]
    rate = max(rows, key=lambda r: r["images"])["generation"] if rows else None
    spec = protocol()
    result: dict[str, Any] = {"protocol": spec, "ms_per_iteration": t, "generation_images_per_s": rate}
    ours = [s for s in spec["settings"] if s["uses_sam"]]
    plans = {
        "the paper (stage 0, stage 1, the SAM setting's generations)": ours,
        f"{spec['file']} as shipped (every setting)": spec["settings"],
    }
    result["plans"] = {}
    for label, settings in plans.items():
        needed = ["stage0", "stage1"] + sorted({"sam" if s["uses_sam"] else "nosam" for s in settings})
        if rate is None or any(t[k] is None for k in needed):
            result["plans"][label] = None
            continue
        one = projected_seconds(spec, settings, t, rate)
        total = one["train_s"] + one["labels_s"]
        result["plans"][label] = {**one, "one_gpu_h": total / 3600, "eight_gpus_h": total / 8 / 3600}
    return result


PROJECTION_ASSUMPTIONS = (
    "Training: each stage's trainer.max_steps times the measured Lightning bf16 ms/iteration of its step with "
    "1280x720 sources and 1024x512 targets (batch 1 + 1; source_step); pseudo labels: one pass over the "
    f"{CITYSCAPES_TRAIN_IMAGES} Cityscapes training images at the generation step's images/s for generation 1 "
    "(made once, from stage 0) and one per later generation of each setting. Not included: validation every "
    "2000 steps and data loading (assumed never to starve the GPU). 8 GPUs: DDP with one process per GPU, each taking "
    "1 + 1 images per step at the per-GPU step time measured here (the gradient all-reduce is not measured), "
    "trainer.max_steps divided by 8 (the same number of images seen), and each pass of pseudo labels split over the "
    "8 GPUs: one GPU's time divided by 8, a lower bound."
)


def floors(results: dict[str, dict[str, Any] | None]) -> list[dict[str, str]]:
    """Every floor, from the steps' results files (``None`` for a step without one)."""
    train = results.get("train_step")
    return [
        *lightning_floors(train),
        bf16_floor(train, results.get("train_profile")),
        sam_share_floor(train),
        large_step_floor(results.get("large_step")),
        generation_floor(results.get("generation")),
        *sam_floors(results.get("sam")),
    ]


# ------------------------------------------------------------------------------------------------- summary
def hours(value: float) -> str:
    return f"{value:.1f} h" if value < 48 else f"{value:.0f} h ({value / 24:.1f} days)"


def projection_lines(result: dict[str, Any]) -> list[str]:
    t, rate = result["ms_per_iteration"], result["generation_images_per_s"]
    measured = ", ".join(f"{k} {v:.1f}" for k, v in t.items() if v is not None) or "none"
    lines = [
        f"- ms/iteration measured: {measured}; generation images/s: {f'{rate:.1f}' if rate else 'not measured'}",
        "",
        "| plan | training | pseudo-label passes | one GPU | 8 GPUs |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, plan in result["plans"].items():
        if plan is None:
            lines.append(f"| {label} | not measured | | | |")
            continue
        lines.append(f"| {label} | {hours(plan['train_s'] / 3600)} | {plan['label_passes']} "
                     f"({hours(plan['labels_s'] / 3600)}) | {hours(plan['one_gpu_h'])} | {hours(plan['eight_gpus_h'])} |")  # fmt: skip
    return lines + ["", PROJECTION_ASSUMPTIONS]


def machine_lines(machine: dict[str, Any], device: dict[str, Any] | None) -> list[str]:
    packages = ", ".join(f"{name} {version}" for name, version in machine["packages"].items())
    gpus = (
        "; ".join(f"{g['name']} ({g['memory']}, driver {g['driver']})" for g in machine.get("gpus", []))
        or "none"
    )
    lines = [
        f"- GPU: {gpus}",
        f"- CPU: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB RAM; "
        f"load average at the start {machine['loadavg']}",
        f"- Python {machine['python']}, {machine['platform']}; {packages}",
    ]
    if device:
        cuda = (
            f"CUDA {device['cuda']}, cuDNN {device['cudnn']}; {device['tf32']}" if "cuda" in device else "CPU"
        )
        lines.append(
            f"- as the steps saw it: torch {device['torch']}, lightning {device['lightning']}; {cuda}"
        )
    return lines


def summary(args: argparse.Namespace, machine: dict[str, Any], records: list[StepRecord], elapsed: float,
            finished: bool, steps_dir: Path) -> dict[str, Any]:  # fmt: skip
    """The summary record: the run, the machine, each step, the floors and the projection."""
    results = {r.name: read_json(steps_dir / f"{r.name}.json") for r in records if r.name != "cuda_checks"}
    device = next((r["machine"] for r in results.values() if r and "machine" in r), None)
    return {
        "suite": {
            "smoke": args.smoke,
            "budget_s": args.budget,
            "elapsed_s": round(elapsed, 1),
            "finished": finished,
            "command": " ".join(["python3 benchmarks/gpu_suite.py", *args.argv]),
        },
        "machine": machine,
        "device": device,
        "steps": [asdict(r) for r in records],
        "floors": floors(results),
        "profile": profile_summary(results.get("train_profile")),
        "projection": projection(results.get("source_step"), results.get("generation")),
    }


def profile_summary(profile: dict[str, Any] | None) -> dict[str, Any]:
    """Each variant of the train_profile step: its ms/iteration, its error or the totals of its profile."""
    return {
        name: {"iteration_ms": v.get("iteration_ms"), "error": v.get("error"), "profile": v.get("profile")}
        for name, v in (profile or {}).get("variants", {}).items()
    }


def profile_lines(profile: dict[str, Any], folder: str) -> list[str]:
    """The summary's lines on the train_profile step (none when it did not run)."""
    if not profile:
        return []
    lines = ["", "## Profile of the training step (train_profile)", ""]
    for name, v in profile.items():
        if v["error"]:
            lines.append(f"- {name}: {v['error']}")
            continue
        totals = v["profile"]
        text = f"{totals['text']}; `{folder}/train_profile/{totals['file']}`" if totals else "not profiled"
        lines.append(f"- {name}: {v['iteration_ms']:.1f} ms/iteration; {text}")
    lines += ["", "Busy time: the device's on a GPU (kernels, copies), the CPU operators' in the rehearsal; conv: "
              "kernels launched by convolution operators; layout/copy: kernels named like nchwToNhwc, nhwcToNchw, "
              "transpose, convert, copy, cast (benchmarks/profiling.py)."]  # fmt: skip
    return lines


def summary_markdown(record: dict[str, Any], folder: str) -> str:
    suite, machine = record["suite"], record["machine"]
    title = "GPU suite" if not suite["smoke"] else "GPU suite rehearsal on the CPU (--smoke)"
    where = machine["gpus"][0]["name"] if machine.get("gpus") and not suite["smoke"] else machine["cpu"]
    lines = [f"# {title}: {where}", ""]
    if suite["smoke"]:
        lines += ["Tiny networks and sizes on the CPU: this proves the flow, the budget and the files; the figures "
                  "below are not GPU figures and the verdicts do not judge the floors.", ""]  # fmt: skip
    lines += [
        *machine_lines(machine, record["device"]),
        f"- date: {machine['date']}; command: `{suite['command']}`",
        f"- budget {suite['budget_s']:.0f} s, used {suite['elapsed_s']:.0f} s"
        + ("" if suite["finished"] else " so far (run in progress or cut off)"),
        f"- every step's files (results .md / .json, log) are in `{folder}/` and the archive",
        "",
        "## Steps",
        "",
        "| step | what | status | wall s | box s | result |",
        "|---|---|---|---:|---:|---|",
    ]
    for step in record["steps"]:
        wall = "" if step["wall_s"] is None else f"{step['wall_s']:.0f}"
        lines.append(f"| {step['name']} | {step['title']} | {step['status']} | {wall} | {step['box_s'] or 0:.0f} "
                     f"| {step['headline'].replace('|', '/')} |")  # fmt: skip
    lines += ["", "## Floors", "", "| floor | verdict | figures |", "|---|---|---|"]
    lines += [f"| {f['floor']} | {f['verdict']} | {f['figures']} |" for f in record["floors"]]
    lines += profile_lines(record.get("profile") or {}, folder)
    lines += ["", "## Projected wall time of the GTA5 protocol", "", *projection_lines(record["projection"])]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_summary(
    args: argparse.Namespace, record: dict[str, Any], stem: Path, steps_dir: Path
) -> list[Path]:
    """Write the summary (.md, .json) and the archive of everything; copy the three to ``--export``."""
    md, js, archive = stem.with_suffix(".md"), stem.with_suffix(".json"), stem.with_suffix(".tar.gz")
    write_atomically(js, lambda p: p.write_text(json.dumps(record, indent=2)))
    write_atomically(md, lambda p: p.write_text(summary_markdown(record, steps_dir.name)))

    def pack(path: Path) -> None:
        with tarfile.open(path, "w:gz") as tar:
            for item in (md, js, steps_dir):
                tar.add(item, arcname=item.name)

    write_atomically(archive, pack)
    if args.export is not None:
        args.export.mkdir(parents=True, exist_ok=True)
        for path in (md, js, archive):
            shutil.copyfile(path, args.export / path.name)
    return [md, js, archive]


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    missing = missing_packages()
    if missing:
        print(f"gpu_suite.py: error: missing packages: {', '.join(missing)} (install them or put them on "
              "PYTHONPATH)", file=sys.stderr)  # fmt: skip
        return 2
    machine = host_info()
    stem = args.out_dir / f"gpu_{'smoke_' if args.smoke else ''}{machine['slug']}"
    steps_dir = stem.parent / stem.name
    if steps_dir.exists():
        shutil.rmtree(steps_dir)  # the files of an earlier run on this machine: replaced as a whole
    steps_dir.mkdir(parents=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    grace = SMOKE_GRACE_S if args.smoke else GRACE_S
    chosen = [s for s in STEPS if args.steps is None or s.name in args.steps]
    boxes = fit_boxes(chosen, args.budget, args.smoke)
    records = [StepRecord(s.name, s.title, box_s=boxes[s.name]) for s in chosen]
    print(f"gpu_suite: {len(chosen)} steps, budget {args.budget:.0f} s, files in {steps_dir}", flush=True)
    try:
        for index, step in enumerate(chosen):
            left = args.budget - (time.monotonic() - started) - RESERVE_S
            need = boxes[step.name] + grace
            if need > left:
                records[index].status = f"skipped: budget (needs {need:.0f} s, {max(left, 0):.0f} s left)"
            else:
                records[index] = run_step(step, args.smoke, steps_dir, tmp_dir, boxes[step.name])
            done = records[index]
            wall = f" in {done.wall_s:.0f} s" if done.wall_s is not None else ""
            print(
                f"[{index + 1}/{len(chosen)}] {step.name}: {done.status}{wall}: {done.headline}", flush=True
            )
            record = summary(args, machine, records, time.monotonic() - started, False, steps_dir)
            write_summary(args, record, stem, steps_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    record = summary(args, machine, records, time.monotonic() - started, True, steps_dir)
    files = write_summary(args, record, stem, steps_dir)
    print(summary_markdown(record, steps_dir.name))
    print("wrote " + ", ".join(str(p) for p in files), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
