"""Time and peak memory of the SAM attention kernels, forward + backward, over the number of pixels N.

Usage (from the repository root)::

    python benchmarks/sam.py                       # CUDA when available, else CPU
    python benchmarks/sam.py --device cpu --sizes 1024 4096 8192 16384

Each configuration runs ``SelfAttentionModule(C, impl=...)`` (with its 1x1 transform, as in training) on logits
``(1, C, h, w)``, ``h * w = N``, that require a gradient, then ``out.backward(grad)``.

Memory is measured as follows:

- CUDA: ``torch.cuda.max_memory_allocated()`` over the runs (after ``reset_peak_memory_stats``); the table gives
  the peak and the extra over what was allocated before the first run (inputs, weights).
- CPU: every configuration runs in a fresh subprocess. The kernel's high-water mark of resident memory (VmHWM) is
  reset through ``/proc/self/clear_refs`` right before the first run; extra = VmHWM after the runs - VmRSS before.
  This counts everything the process touched (tensors, allocator and BLAS workspaces), not only tensors. Without
  ``clear_refs`` the worker falls back to ``ru_maxrss`` (which then also covers start-up).

``--time-box SECONDS`` bounds the whole run: each configuration gets an even share of what is left and stops
repeating when its share is used (after at least one timed run); configurations that no longer fit are recorded as
skipped. The results files are rewritten after every configuration, so a run cut short still leaves them.

Results go to ``benchmarks/results/sam_<machine>.md`` and ``.json`` (``--out-dir``, ``--stem``) with the machine,
torch version and targets.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine import machine_info  # benchmarks/machine.py (the script's folder is on sys.path)
from timing import TimeBox, timed  # benchmarks/timing.py

try:
    from uda_sam.nn import SelfAttentionModule
except ImportError:  # running from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from uda_sam.nn import SelfAttentionModule

MIB = 2**20
GIB = 2**30


def grid_for(num_pixels: int) -> tuple[int, int]:
    """The most square ``(h, w)`` with ``h * w = num_pixels``."""
    height = max(d for d in range(1, math.isqrt(num_pixels) + 1) if num_pixels % d == 0)
    return height, num_pixels // height


def _proc_status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def _reset_cpu_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def run_config(
    impl: str,
    num_pixels: int,
    channels: int,
    block_size: int,
    device: str,
    warmup: int,
    repeats: int,
    seconds: float = float("inf"),
) -> dict:
    """Run one configuration in this process and return its measurements.

    Repeats stop once ``seconds`` have passed (after at least one timed run); ``repeats`` in the result is the
    number of timed runs made.
    """
    stop_at = time.monotonic() + seconds
    torch.manual_seed(0)
    dev = torch.device(device)
    height, width = grid_for(num_pixels)
    sam = SelfAttentionModule(channels, impl=impl, block_size=block_size).to(dev)
    logits = torch.randn(1, channels, height, width, device=dev, requires_grad=True)
    upstream = torch.randn(1, channels, height, width, device=dev)
    result: dict = {"impl": impl, "N": num_pixels, "h": height, "w": width, "C": channels, "block_size": block_size,
                    "threads": torch.get_num_threads()}  # fmt: skip

    def step() -> float:
        seconds = timed(lambda: sam(logits).backward(upstream), dev)
        logits.grad = None
        sam.zero_grad(set_to_none=True)
        return seconds

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        base_kib = _proc_status_kib("VmRSS")
        reset = _reset_cpu_peak()
    try:
        for _ in range(warmup):
            step()
        times = [step()]
        while len(times) < repeats and time.monotonic() < stop_at:
            times.append(step())
    except torch.cuda.OutOfMemoryError:
        result["error"] = "out of memory"
        return result
    result["repeats"] = len(times)
    result["median_ms"] = 1000 * statistics.median(times)
    result["min_ms"] = 1000 * min(times)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev)
        result["peak_mib"] = peak / MIB
        result["extra_mib"] = (peak - base) / MIB
        result["memory_method"] = "torch.cuda.max_memory_allocated"
    else:
        hwm_kib = _proc_status_kib("VmHWM") if reset else None
        if hwm_kib is not None and base_kib is not None:
            result["peak_mib"] = hwm_kib / 1024
            result["extra_mib"] = (hwm_kib - base_kib) / 1024
            result["memory_method"] = "VmHWM (reset via clear_refs) - VmRSS before"
        else:
            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            result["peak_mib"] = peak_kib / 1024
            result["extra_mib"] = (peak_kib - (base_kib or 0)) / 1024
            result["memory_method"] = "ru_maxrss - VmRSS before (includes start-up peak)"
    return result


def run_in_subprocess(
    args: argparse.Namespace, impl: str, num_pixels: int, seconds: float, box: TimeBox
) -> dict:
    """CPU: one fresh process per configuration, so peaks do not carry over (killed when ``box`` runs out)."""
    config = {"impl": impl, "n": num_pixels, "channels": args.channels, "block_size": args.block_size,
              "device": "cpu", "warmup": args.warmup, "repeats": args.repeats, "threads": args.threads,
              "seconds": seconds}  # fmt: skip
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(config)],
            capture_output=True,
            text=True,
            check=False,
            timeout=max(box.left(), 1.0) if box.seconds is not None else None,
        )
    except subprocess.TimeoutExpired:
        box.reached = True
        return {"impl": impl, "N": num_pixels, "error": "killed: time box used up"}
    if proc.returncode != 0:
        return {
            "impl": impl,
            "N": num_pixels,
            "error": proc.stderr.strip().splitlines()[-1:] or f"rc {proc.returncode}",
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_targets(device: str, rows: list[dict]) -> list[str]:
    """The targets, as PASS/FAIL lines (only those measured)."""
    found = {(r["impl"], r["N"]): r for r in rows if "error" not in r}
    lines = []
    if device == "cpu" and ("blockwise", 16384) in found:
        extra = found["blockwise", 16384]["extra_mib"]
        verdict = "PASS" if extra < 1024 else "FAIL"
        lines.append(f"{verdict}: blockwise, N = 16384, fwd+bwd extra memory {extra:.0f} MiB < 1024 MiB")
    if device == "cuda":
        if ("blockwise", 32768) in found:
            row = found["blockwise", 32768]
            verdict = "PASS" if row["peak_mib"] <= 1024 else "FAIL"
            lines.append(f"{verdict}: blockwise, N = 32768, peak {row['peak_mib']:.0f} MiB <= 1024 MiB")
            if ("full", 32768) in found:
                full = found["full", 32768]["median_ms"]
                verdict = "PASS" if row["median_ms"] <= full else "FAIL"
                lines.append(
                    f"{verdict}: blockwise N = 32768 {row['median_ms']:.1f} ms <= full {full:.1f} ms"
                )
        if ("blockwise", 8192) in found:
            ms = found["blockwise", 8192]["median_ms"]
            verdict = "PASS" if ms <= 5 else "FAIL"
            lines.append(f"{verdict}: blockwise, N = 8192, {ms:.2f} ms <= 5 ms (target set for one H100)")
    return lines


def headline(rows: list[dict], planned: int, targets: list[str]) -> str:
    """One line: configurations measured, the largest blockwise one, and the target verdicts."""
    done = [r for r in rows if "error" not in r]
    parts = [f"{len(done)}/{planned} configurations measured"]
    blockwise = [r for r in done if r["impl"] == "blockwise"]
    if blockwise:
        top = max(blockwise, key=lambda r: r["N"])
        parts.append(f"blockwise N = {top['N']}: {top['median_ms']:.1f} ms, peak {top['peak_mib']:.0f} MiB")
    verdicts = [t.split(":", 1)[0] for t in targets]
    if verdicts:
        parts.append(f"targets {verdicts.count('PASS')} PASS, {verdicts.count('FAIL')} FAIL")
    return "; ".join(parts)


def write_report(
    out_dir: Path,
    stem_name: str,
    device: str,
    info: dict,
    rows: list[dict],
    planned: int,
    box: TimeBox,
    argv: list[str],
    complete: bool,
) -> Path:
    """Write ``<stem>.md`` and ``.json`` with what has been measured so far."""
    targets = check_targets(device, rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / stem_name
    record = {
        "machine": info,
        "command": f"python benchmarks/sam.py {' '.join(argv)}".rstrip(),
        "results": rows,
        "targets": targets,
        "time_box": box.record(),
        "complete": complete,
        "headline": headline(rows, planned, targets),
    }
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2))
    lines = [
        f"# SAM attention, forward + backward: {info.get('gpu', info['cpu'])}",
        "",
        f"- device: {device}"
        + (
            f" ({info['gpu']}, {info['gpu_memory_gib']} GiB, CUDA {info['cuda']})" if device == "cuda" else ""
        ),
        f"- CPU: {info['cpu']}, {info['cores']} cores visible, {info['ram_gib']} GiB RAM, "
        f"torch threads {rows[0].get('threads', info['threads']) if rows else info['threads']}",
        f"- load average at the start: {info.get('loadavg', '?')} (the CPU may be shared; times are wall clock)",
        f"- torch {info['torch']}, Python {info['python']}, {info['platform']}",
        f"- date: {info['date']}",
        f"- command: `python benchmarks/sam.py {' '.join(argv)}`".rstrip(),
        "- input: logits (1, C, h, w) with a gradient, `SelfAttentionModule(C, impl=...)` with its 1x1 transform; "
        "time = median wall time of forward + backward",
        f"- memory: {rows[0].get('memory_method', 'n/a') if rows else 'n/a'}",
        f"- time box: {box.seconds or 'none'} s{' (reached: later runs cut short or skipped)' if box.reached else ''}"
        f"{'' if complete else '; run still in progress or cut short'}",
        "",
        "| impl | N | h x w | C | block | median ms | min ms | peak MiB | extra MiB |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['N']} | | | | {r['error']} | | | |")
            continue
        lines.append(
            f"| {r['impl']} | {r['N']} | {r['h']} x {r['w']} | {r['C']} | {r['block_size'] if r['impl'] == 'blockwise' else '-'} "
            f"| {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['peak_mib']:.0f} | {r['extra_mib']:.0f} |"
        )
    if targets:
        lines += ["", "## Targets", "", *[f"- {t}" for t in targets]]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem.with_suffix(".md")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--sizes", type=int, nargs="+", help="values of N (default depends on the device)")
    parser.add_argument("--impls", nargs="+", choices=["full", "blockwise"], default=["full", "blockwise"])
    parser.add_argument(
        "--max-full-n",
        type=int,
        help="skip impl=full above this N (default 8192 CPU: 16384 takes ~6 GiB there; 32768 CUDA)",
    )
    parser.add_argument("--channels", type=int, default=19)
    parser.add_argument("--block-size", type=int, default=2048)
    parser.add_argument(
        "--threads", type=int, help="torch.set_num_threads for CPU runs (default: torch's choice)"
    )
    parser.add_argument("--warmup", type=int, help="untimed runs (default 1 CPU, 3 CUDA)")
    parser.add_argument("--repeats", type=int, help="timed runs (default 3 CPU, 20 CUDA)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--stem", help="results file name without suffix (default: sam_<machine>)")
    parser.add_argument(
        "--time-box",
        type=float,
        help="seconds for the whole run (default: no limit); see the module docstring",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="CPU: run every configuration in this process (faster start; memory figures then carry over)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    raw = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw)
    try:
        box = TimeBox(args.time_box)
    except ValueError as error:
        parser.error(str(error))
    if args.worker:
        cfg = json.loads(args.worker)
        if cfg.get("threads"):
            torch.set_num_threads(cfg["threads"])
        result = run_config(
            cfg["impl"],
            cfg["n"],
            cfg["channels"],
            cfg["block_size"],
            cfg["device"],
            cfg["warmup"],
            cfg["repeats"],
            cfg["seconds"],
        )
        print(json.dumps(result))
        return
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    on_gpu = device == "cuda"
    sizes = args.sizes or ([1024, 4096, 8192, 16384, 32768] if on_gpu else [1024, 4096, 8192, 16384])
    max_full = args.max_full_n or (32768 if on_gpu else 8192)
    args.warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    args.repeats = args.repeats or (20 if on_gpu else 3)
    info = machine_info(device)
    configs = [(impl, n) for n in sizes for impl in args.impls if not (impl == "full" and n > max_full)]
    stem = args.stem or f"sam_{info['slug']}"
    rows: list[dict] = []
    for index, (impl, num_pixels) in enumerate(configs):
        if box.expired():
            row = {"impl": impl, "N": num_pixels, "error": "skipped: time box used up"}
        else:
            seconds = box.share(len(configs) - index) - time.monotonic()
            if on_gpu or args.in_process:
                row = run_config(
                    impl,
                    num_pixels,
                    args.channels,
                    args.block_size,
                    device,
                    args.warmup,
                    args.repeats,
                    seconds,
                )
                if on_gpu:
                    torch.cuda.empty_cache()
            else:
                row = run_in_subprocess(args, impl, num_pixels, seconds, box)
            if row.get("repeats", args.repeats) < args.repeats:
                box.reached = True  # cut short by its share of the box
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_report(args.out_dir, stem, device, info, rows, len(configs), box, raw, complete=False)
    path = write_report(args.out_dir, stem, device, info, rows, len(configs), box, raw, complete=True)
    print("\n".join(check_targets(device, rows)))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
