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

Results go to ``benchmarks/results/sam_<machine>.md`` and ``.json`` with the machine, torch version and targets.
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
from pathlib import Path

import torch
from machine import machine_info  # benchmarks/machine.py (the script's folder is on sys.path)
from timing import timed  # benchmarks/timing.py

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
    impl: str, num_pixels: int, channels: int, block_size: int, device: str, warmup: int, repeats: int
) -> dict:
    """Run one configuration in this process and return its measurements."""
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
        times = [step() for _ in range(repeats)]
    except torch.cuda.OutOfMemoryError:
        result["error"] = "out of memory"
        return result
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


def run_in_subprocess(args: argparse.Namespace, impl: str, num_pixels: int) -> dict:
    """CPU: one fresh process per configuration, so peaks do not carry over."""
    config = {"impl": impl, "n": num_pixels, "channels": args.channels, "block_size": args.block_size,
              "device": "cpu", "warmup": args.warmup, "repeats": args.repeats, "threads": args.threads}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return {
            "impl": impl,
            "N": num_pixels,
            "error": proc.stderr.strip().splitlines()[-1:] or f"rc {proc.returncode}",
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_targets(device: str, rows: list[dict]) -> list[str]:
    """The figures of the issue, as PASS/FAIL lines (only those measured)."""
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


def write_report(
    out_dir: Path, device: str, info: dict, rows: list[dict], targets: list[str], argv: list[str]
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"sam_{info['slug']}"
    stem.with_suffix(".json").write_text(
        json.dumps({"machine": info, "results": rows, "targets": targets}, indent=2)
    )
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
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    raw = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw)
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
    rows = []
    for num_pixels in sizes:
        for impl in args.impls:
            if impl == "full" and num_pixels > max_full:
                continue
            if on_gpu:
                row = run_config(
                    impl, num_pixels, args.channels, args.block_size, device, args.warmup, args.repeats
                )
                torch.cuda.empty_cache()
            else:
                row = run_in_subprocess(args, impl, num_pixels)
            rows.append(row)
            print(json.dumps(row), flush=True)
    targets = check_targets(device, rows)
    path = write_report(args.out_dir, device, info, rows, targets, raw)
    print("\n".join(targets))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
