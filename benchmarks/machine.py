"""What the benchmark scripts record about the machine they ran on, and the file-name slug derived from it."""

from __future__ import annotations

import os
import platform
import re
from datetime import datetime, timezone
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slug(text: str) -> str:
    """``text`` in lower case with every run of other characters than letters and digits turned into ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_info(device: str | torch.device) -> dict[str, str]:
    """CPU, memory, versions, date and load average, plus the GPU and its settings when ``device`` is CUDA.

    ``info["slug"]`` names the machine in results files: the GPU's name, else ``cpu-<model>-<cores>c``.
    """
    info = {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?",
        "ram_gib": "?",
    }
    try:
        import lightning

        info["lightning"] = lightning.__version__
    except ImportError:
        info["lightning"] = "not installed"
    meminfo = (
        re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
        if Path("/proc/meminfo").is_file()
        else None
    )
    if meminfo:
        info["ram_gib"] = f"{int(meminfo.group(1)) / 2**20:.1f}"
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = props.name
        info["gpu_memory_gib"] = f"{props.total_memory / 2**30:.1f}"
        info["cuda"] = str(torch.version.cuda)
        info["cudnn"] = str(torch.backends.cudnn.version())
        info["tf32"] = (
            f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
            f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
            f"float32_matmul_precision={torch.get_float32_matmul_precision()}"
        )
    info["slug"] = slug(info["gpu"]) if "gpu" in info else f"cpu-{slug(info['cpu'])}-{info['cores']}c"
    return info
