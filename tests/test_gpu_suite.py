"""``benchmarks/gpu_suite.py``: its CPU rehearsal (``--smoke``), its budget, its hard limit, floors and errors."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
SUITE = BENCHMARKS / "gpu_suite.py"


@pytest.fixture(scope="module")
def suite() -> ModuleType:
    """``benchmarks/gpu_suite.py`` as a module (its folder on ``sys.path`` for its ``machine`` import)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def run_suite(*args: str) -> subprocess.CompletedProcess[str]:
    """The suite as a user runs it: ``python3 benchmarks/gpu_suite.py ...`` from a source tree."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, str(SUITE), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def summary_of(out_dir: Path) -> tuple[dict[str, Any], Path]:
    """The summary record of the one run in ``out_dir`` and its steps' folder."""
    [summary] = out_dir.glob("gpu_*.json")
    return json.loads(summary.read_text()), summary.with_suffix("")


@pytest.mark.slow
def test_smoke_run_leaves_every_file(suite: ModuleType, tmp_path: Path) -> None:
    out, export = tmp_path / "out", tmp_path / "export"
    proc = run_suite("--smoke", "--out-dir", str(out), "--export", str(export))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record, steps_dir = summary_of(out)

    names = [step.name for step in suite.STEPS]
    assert [step["name"] for step in record["steps"]] == names
    for index, step in enumerate(record["steps"]):
        assert step["status"] == "ok", step
        assert f"[{index + 1}/{len(names)}] {step['name']}: ok" in proc.stdout  # one line per step
        suffixes = (".md", ".json", ".log") + ((".xml",) if step["name"] == "cuda_checks" else ())
        for suffix in suffixes:
            assert (steps_dir / f"{step['name']}{suffix}").is_file(), (step["name"], suffix)
    assert json.loads((steps_dir / "cuda_checks.json").read_text())["counts"]["failed"] == 0

    assert record["suite"]["smoke"] and record["suite"]["finished"]
    assert record["suite"]["elapsed_s"] <= record["suite"]["budget_s"]
    verdicts = {f["floor"]: f["verdict"] for f in record["floors"]}
    assert len(verdicts) >= 7 and set(verdicts.values()) <= {"PASS", "FAIL", "not measured"}
    assert verdicts["Lightning step <= 1.05x the plain loop (fp32)"] in (
        "PASS",
        "FAIL",
    )  # measured in the smoke
    markdown = steps_dir.with_suffix(".md").read_text()
    assert "## Floors" in markdown and "## Projected wall time" in markdown

    # The profile tables of train_profile: written, listed with the step, quoted with the bf16 floor.
    profiles = ["train_profile/plain-fp32_profile.txt", "train_profile/plain-fp32-cl_profile.txt"]
    [profile_step] = [step for step in record["steps"] if step["name"] == "train_profile"]
    assert set(profiles) <= set(profile_step["files"])
    for name in profiles:
        table = (steps_dir / name).read_text()
        assert "per traced step: wall" in table and "aten::" in table
        assert len(table) < 8000  # compact: the archive must stay small
    figures = {f["floor"]: f["figures"] for f in record["floors"]}["bf16 step <= 0.72x the fp32 plain step"]
    assert "plain-fp32-cl" in figures and "conv / layout-copy share" in figures
    assert "## Profile of the training step (train_profile)" in markdown

    with tarfile.open(steps_dir.with_suffix(".tar.gz")) as archive:
        packed = set(archive.getnames())
    assert {f"{steps_dir.name}.md", f"{steps_dir.name}.json"} <= packed
    assert {f"{steps_dir.name}/{p.name}" for p in steps_dir.iterdir()} <= packed
    assert {f"{steps_dir.name}/{name}" for name in profiles} <= packed
    assert sorted(p.name for p in export.iterdir()) == sorted(
        steps_dir.with_suffix(s).name for s in (".json", ".md", ".tar.gz")
    )


@pytest.mark.slow
def test_steps_that_do_not_fit_the_budget_are_skipped(suite: ModuleType, tmp_path: Path) -> None:
    first = suite.STEPS[0]
    budget = first.smoke_box_s + suite.SMOKE_GRACE_S + suite.RESERVE_S + 1  # room for the first step only
    assert all(s.smoke_box_s > first.smoke_box_s + 1 for s in suite.STEPS[1:])
    proc = run_suite("--smoke", "--budget", f"{budget:g}", "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record, steps_dir = summary_of(tmp_path)

    ran, *skipped = record["steps"]
    assert ran["name"] == first.name and ran["status"] == "ok"
    assert (steps_dir / f"{first.name}.json").is_file()
    for step in skipped:
        assert step["status"].startswith("skipped: budget"), step
        assert step["wall_s"] is None and not list(steps_dir.glob(f"{step['name']}.*"))
    assert record["suite"]["elapsed_s"] <= budget
    assert steps_dir.with_suffix(".md").is_file() and steps_dir.with_suffix(".tar.gz").is_file()


def test_a_step_past_its_hard_limit_is_killed(suite: ModuleType, tmp_path: Path) -> None:
    began = time.monotonic()
    code = suite.run_process(
        [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "hung.log", 1.0
    )
    assert code is None and time.monotonic() - began < 30
    assert suite.step_status(code, {}) == "killed at its hard limit (no results file)"


def test_cuda_checks_without_pytest_are_recorded_as_not_run(
    suite: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "pytest" else find_spec(name)
    )
    [checks] = [step for step in suite.STEPS if step.script is None]
    record = suite.run_step(checks, True, tmp_path, tmp_path, checks.smoke_box_s)
    assert (
        record.status == "not run: pytest missing" and record.wall_s is None and not list(tmp_path.iterdir())
    )


def test_missing_packages_stop_the_suite_with_one_line(
    suite: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(
        suite, "REQUIRED", {"torch": "torch", "no_such_module_for_the_suite": "no-such-package"}
    )
    assert suite.main(["--smoke", "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing packages: no-such-package" in err[0] and "torch" not in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("budget", ["0", "-3", "soon"])
def test_bad_budget_names_the_option(
    suite: ModuleType, budget: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        suite.main(["--budget", budget])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert "--budget" in err and "positive number of seconds" in err


def train_record(size: list[int], source_size: list[int], **iteration_ms: float | None) -> dict[str, Any]:
    """A ``train_step.py`` record with the given ms/iteration per variant (``None``: out of memory)."""
    variants = {
        name.replace("_", "-"): {"iteration_ms": ms, "peak_mib": 1000.0, "error": None}
        if ms is not None
        else {"iteration_ms": None, "peak_mib": None, "error": "out of memory: CUDA out of memory"}
        for name, ms in iteration_ms.items()
    }
    return {"size": size, "source_size": source_size, "sam_impl": "blockwise", "variants": variants}


def test_floors_and_projection_from_step_records(suite: ModuleType) -> None:
    train = train_record([1024, 512], [1024, 512], plain_fp32=100.0, lightning_fp32=103.0, plain_bf16=70.0,
                         lightning_bf16=71.0, lightning_bf16_nosam=70.5)  # fmt: skip
    large = train_record([2048, 1024], [2048, 1024], lightning_bf16=None)
    generation = {"rows": [{"images": 64, "plain": 100.0, "generation": 80.0, "rss_growth_mib": 90.0},
                           {"images": 256, "plain": 100.0, "generation": 95.0, "rss_growth_mib": 120.0}]}  # fmt: skip
    verdicts = {
        f["floor"]: f["verdict"]
        for f in suite.floors({"train_step": train, "large_step": large, "generation": generation})
    }
    assert verdicts == {
        "Lightning step <= 1.05x the plain loop (fp32)": "PASS",  # 1.03
        "Lightning step <= 1.05x the plain loop (bf16)": "PASS",  # 1.014
        "bf16 step <= 0.72x the fp32 plain step": "PASS",  # 71 / 100
        "SAM loss <= 3 % of the bf16 step at 1024x512": "PASS",  # 0.5 / 71 = 0.7 %
        "a 2048x1024 step with the SAM fits": "FAIL",  # out of memory
        "generation >= 0.90x plain inference, host memory growth < 1 GiB": "PASS",  # 0.95 at 256 images
        "SAM kernels: the targets of sam.py": "not measured",
    }
    slow = train_record(
        [1024, 512], [1024, 512], plain_fp32=100.0, lightning_bf16=80.0, lightning_bf16_nosam=70.0
    )
    verdicts = {f["floor"]: f["verdict"] for f in suite.floors({"train_step": slow})}
    assert verdicts["bf16 step <= 0.72x the fp32 plain step"] == "FAIL"
    assert verdicts["SAM loss <= 3 % of the bf16 step at 1024x512"] == "FAIL"
    assert verdicts["Lightning step <= 1.05x the plain loop (fp32)"] == "not measured"
    assert verdicts["generation >= 0.90x plain inference, host memory growth < 1 GiB"] == "not measured"
    sam = {
        "targets": [
            "PASS: blockwise, N = 8192, 2.00 ms <= 5 ms",
            "FAIL: blockwise N = 32768 9.0 ms <= full 8.0 ms",
        ]
    }
    verdicts = {f["floor"]: f["verdict"] for f in suite.floors({"sam": sam})}
    assert verdicts["SAM kernel: blockwise, N = 8192, 2.00 ms <= 5 ms"] == "PASS"
    assert verdicts["SAM kernel: blockwise N = 32768 9.0 ms <= full 8.0 ms"] == "FAIL"

    source = train_record([1024, 512], [1280, 720], lightning_bf16_stage0=50.0, lightning_bf16_stage1=60.0,
                          lightning_bf16=80.0, lightning_bf16_nosam=78.0)  # fmt: skip
    result = suite.projection(source, generation)
    spec = result["protocol"]
    assert spec["file"] == "configs/gta5/pipeline.yaml" and len(spec["settings"]) == 2
    [ours] = [s for s in spec["settings"] if s["uses_sam"]]
    paper, shipped = result["plans"].values()
    train_ms = (
        spec["stage0_steps"] * 50.0 + spec["stage1_steps"] * 60.0 + ours["generations"] * ours["steps"] * 80.0
    )
    labels_s = (
        (1 + ours["generations"] - 1) * 2975 / 95.0
    )  # generation 1 from stage 0, then one per generation
    assert paper["train_s"] == pytest.approx(train_ms / 1000)
    assert paper["labels_s"] == pytest.approx(labels_s)
    assert paper["one_gpu_h"] == pytest.approx((train_ms / 1000 + labels_s) / 3600)
    assert paper["eight_gpus_h"] == pytest.approx(paper["one_gpu_h"] / 8)
    assert shipped["label_passes"] == 1 + sum(s["generations"] - 1 for s in spec["settings"])
    assert shipped["train_s"] > paper["train_s"]
    assert all(plan is None for plan in suite.projection(None, generation)["plans"].values())


def test_bf16_floor_quotes_the_profile_step(suite: ModuleType) -> None:
    train = train_record([1024, 512], [1024, 512], plain_fp32=80.0, lightning_bf16=80.4)
    profile = train_record([1024, 512], [1024, 512], plain_bf16=79.0, plain_bf16_cl=55.0, plain_fp32=80.0,
                           plain_fp32_cl=None)  # fmt: skip
    profile["variants"]["plain-bf16"]["profile"] = {
        "conv_share": 0.5,
        "layout_share": 0.3,
        "file": "x",
        "text": "t",
    }
    row = suite.bf16_floor(train, profile)
    assert row["verdict"] == "FAIL"  # still judged on the train_step step alone
    assert "plain-bf16-cl 55.0" in row["figures"] and "bf16/fp32 NCHW x0.988" in row["figures"]
    assert "channels_last x" not in row["figures"]  # plain-fp32-cl not measured: no ratio
    assert "plain-bf16 50 % / 30 %" in row["figures"]
    assert suite.bf16_floor(train)["figures"].endswith("(1024x512)")  # without the step: as before
    lines = suite.profile_lines(suite.profile_summary(profile), "gpu_x")
    assert any(
        line.startswith("- plain-bf16: 79.0 ms/iteration; t; `gpu_x/train_profile/x`") for line in lines
    )
    assert any(line.startswith("- plain-fp32-cl: out of memory") for line in lines)


def benchmark_module(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (its folder on ``sys.path`` for its sibling imports)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    return importlib.import_module(name)


class FakeClock:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_share_cut_short_leaves_the_box_open_and_every_share_gets_its_floor() -> None:
    timing = benchmark_module("timing")
    clock = FakeClock()
    box = timing.TimeBox(100.0, clock=clock, started=0.0)
    share = box.allot(4, min_steps=5)
    assert share.end == 25.0
    clock.now = 60.0  # a slow first step: past the share after one step
    assert not share.done(1) and not share.done(4) and share.done(5)  # the floor, then the share
    box.reached = True  # what a script records for a piece cut short
    assert not box.expired() and box.left() == 40.0  # the next pieces still get what is left
    assert box.allot(3).end == pytest.approx(60.0 + 40.0 / 3)
    clock.now = 100.0
    assert box.expired() and box.allot(1, min_steps=5).done(0)  # the whole box used up: stop at once
    assert not timing.TimeBox(None, clock=clock).expired()


def test_variants_after_one_cut_short_are_measured_not_skipped() -> None:
    """A first variant whose first step outlasts its share (cuDNN's search) must not leave the rest unmeasured."""
    train_step = benchmark_module("train_step")
    clock = FakeClock()
    box = train_step.TimeBox(200.0, clock=clock, started=0.0)
    variants = [train_step.parse_variant(name) for name in train_step.DEFAULT_VARIANTS]
    assert [v.name for v in variants[:5]] == ["plain-fp32", "lightning-fp32", "plain-bf16", "lightning-bf16",
                                              "lightning-bf16-nosam"]  # fmt: skip
    setup = train_step.Setup(device=None, base_network=None, sam_path=Path("sam.pt"), batch={}, warmup=2,
                             steps=20, lambda_sa=0.1, debug_step=None)  # fmt: skip
    first_step_s = {"plain-fp32": 75.0}  # the first variant's first step takes 3x its share of 25 s

    def run_one(variant: Any, share: Any) -> Any:
        taken = 0
        while True:  # the step loop of run_plain / StepTimer: 1 s a step, the first one slower
            clock.now += first_step_s.get(variant.name, 1.0) if taken == 0 else 1.0
            taken += 1
            if taken == setup.total_steps or share.done(taken):
                break
        timed = max(taken - setup.warmup - 1, 0)
        return train_step.Result(variant, step_ms=[1.0] * timed, iteration_ms=[1.0] * timed)

    results: dict[str, Any] = {}
    train_step.measure_variants(variants, box, setup, run_one, results)
    timed = {name: len(r.step_ms) for name, r in results.items()}
    assert all(r.error is None for r in results.values()), results
    assert timed["plain-fp32"] == train_step.MIN_TIMED_STEPS  # its floor, although its share had ended
    assert all(n >= train_step.MIN_TIMED_STEPS for n in timed.values()), timed
    assert box.reached and clock.now <= 200.0 + 75.0


def test_variants_left_when_the_box_is_used_up_are_skipped() -> None:
    train_step = benchmark_module("train_step")
    clock = FakeClock()
    box = train_step.TimeBox(10.0, clock=clock, started=0.0)
    variants = [train_step.parse_variant(name) for name in ("plain-fp32", "lightning-fp32", "plain-bf16")]
    setup = train_step.Setup(device=None, base_network=None, sam_path=Path("sam.pt"), batch={}, warmup=2,
                             steps=20, lambda_sa=0.1, debug_step=None)  # fmt: skip

    def run_one(variant: Any, share: Any) -> Any:
        clock.now += 12.0  # one step past the whole box: stops at once
        assert share.done(1)
        return train_step.Result(variant, error="time box used up after 1 steps (2 warm-up): nothing timed")

    results: dict[str, Any] = {}
    train_step.measure_variants(variants, box, setup, run_one, results)
    assert results["plain-fp32"].error.startswith("time box used up")
    assert [results[n].error for n in ("lightning-fp32", "plain-bf16")] == ["skipped: time box used up"] * 2


def test_boxes_shrink_toward_their_least_so_every_chosen_step_runs(suite: ModuleType) -> None:
    steps = list(suite.STEPS)
    full = {s.name: s.box_s for s in steps}
    need = sum(full.values()) + suite.GRACE_S * len(steps) + suite.RESERVE_S
    assert suite.fit_boxes(steps, need, smoke=False) == full  # they fit: kept
    assert suite.fit_boxes(steps, 60, smoke=True) == {
        s.name: s.smoke_box_s for s in steps
    }  # smoke: never shrunk

    short = need - 60
    boxes = suite.fit_boxes(steps, short, smoke=False)
    assert sum(boxes.values()) + suite.GRACE_S * len(steps) + suite.RESERVE_S <= short + 1
    for step in steps:
        assert step.min_box_s <= boxes[step.name] < step.box_s
    least = suite.fit_boxes(steps, 100, smoke=False)  # not even the least boxes fit
    assert least == {s.name: s.min_box_s for s in steps}


def test_channels_last_variants_are_parsed_and_named() -> None:
    train_step = benchmark_module("train_step")
    variant = train_step.parse_variant("plain-bf16-cl")
    assert variant.channels_last and variant.precision == "bf16" and variant.name == "plain-bf16-cl"
    assert (
        train_step.parse_variant("lightning-bf16-nosam-compile-cl").name == "lightning-bf16-nosam-compile-cl"
    )
    with pytest.raises(ValueError):
        train_step.parse_variant("plain-bf16-cl-nosam")


class FakeEvent:
    """What ``StepProfiler.summary`` reads of a profiler event (times in microseconds)."""

    def __init__(self, name: str, device: Any, time_us: float, kernels: tuple[Any, ...] = (),
                 annotation: bool = False) -> None:  # fmt: skip
        self.name = self.key = name
        self.device_type, self.device_time_total, self.kernels = device, time_us, list(kernels)
        self.self_device_time_total, self.self_cpu_time_total, self.count = time_us, 1.0, 3
        self.is_user_annotation = annotation


def test_profile_shares_on_cuda_come_from_the_kernels(tmp_path: Path) -> None:
    """The CUDA branch of the profile totals, with made-up events (no GPU here)."""
    import torch
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import Kernel

    profiling = benchmark_module("profiling")
    conv = Kernel("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", 0, 600.0)
    to_nhwc = Kernel("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16>", 0, 150.0)
    cast = Kernel("void at::native::elementwise_kernel<direct_copy_kernel_cuda>", 0, 90.0)
    relu = Kernel("void at::native::vectorized_elementwise_kernel<clamp_min>", 0, 60.0)
    events = [
        FakeEvent("aten::cudnn_convolution", DeviceType.CPU, 750.0, (conv, to_nhwc)),
        FakeEvent("aten::_to_copy", DeviceType.CPU, 90.0, (cast,)),
        FakeEvent("aten::relu_", DeviceType.CPU, 60.0, (relu,)),
        *(FakeEvent(k.name, DeviceType.CUDA, k.duration) for k in (conv, to_nhwc, cast, relu)),
        FakeEvent("Optimizer.step#SGD.step", DeviceType.CUDA, 5000.0, annotation=True),  # a range, not work
    ]
    profiler = profiling.StepProfiler(torch.device("cuda"))
    profiler.profiler = type(
        "Fake", (), {"events": lambda self: events, "key_averages": lambda self: events}
    )()
    profiler.traced_since, profiler.traced_until = 0.0, 0.006
    totals = profiler.write(tmp_path / "p.txt", "fake")
    assert totals["busy_ms_per_step"] == pytest.approx(0.9 / profiling.PROFILE_STEPS)
    assert totals["conv_share"] == pytest.approx(600 / 900)  # the conversion inside the conv op is not conv
    assert totals["layout_share"] == pytest.approx(240 / 900)  # nchwToNhwc + the copy kernel
    table = (tmp_path / "p.txt").read_text()
    assert "Optimizer.step" not in table and "nchwToNhwcKernel" in table and "kernel" in table


class CountingProfiler:
    """What ``StepTimer`` calls of a ``StepProfiler``: done after ``steps`` steps."""

    def __init__(self, steps: int) -> None:
        self.steps, self.begun, self.taken = steps, 0, 0

    @property
    def done(self) -> bool:
        return self.taken >= self.steps

    def begin(self) -> None:
        self.begun += 1

    def end(self) -> None:
        self.taken += 1


@pytest.mark.parametrize("profiled", [False, True])
def test_lightning_timer_hands_the_steps_after_the_timed_ones_to_the_profiler(profiled: bool) -> None:
    import torch

    train_step, timing = benchmark_module("train_step"), benchmark_module("timing")
    profiler = CountingProfiler(2) if profiled else None
    timer = train_step.StepTimer(torch.device("cpu"), 1, None, timing.TimeBox(None).allot(1), 4, profiler)
    trainer = type("FakeTrainer", (), {"should_stop": False})()
    last = 5 if profiled else 3  # 1 warm-up + 2 timed + 1 (the last iteration's end), then 2 profiled
    for index in range(last + 1):
        timer.on_train_batch_start(trainer, None, None, index)
        timer.on_train_batch_end(trainer, None, torch.tensor(1.0), None, index)
        assert trainer.should_stop == (index == last)
    assert len(timer.starts) == len(timer.ends) == len(timer.losses) == 4
    if profiler is not None:
        assert profiler.begun == profiler.taken == 2
