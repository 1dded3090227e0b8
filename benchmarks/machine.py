"""What the benchmark scripts record about the machine they ran on, and the file-name slug derived from it.

:func:`host_info` needs no third-party import (the GPU suite describes the machine before anything heavy is
imported); :func:`machine_info` adds what torch knows about the device.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

#: Packages whose versions :func:`host_info` records (distribution names).
PACKAGES = ("torch", "lightning", "torchvision", "torchmetrics", "numpy", "albumentations", "jsonargparse")


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


def package_version(name: str) -> str:
    """The installed version of distribution ``name``, or ``"not installed"`` (nothing is imported)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def nvidia_smi_gpus() -> list[dict[str, str]]:
    """Name, memory and driver of each GPU that ``nvidia-smi`` lists (empty without it)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        fields = [part.strip() for part in line.split(",")]
        if len(fields) == 3:
            gpus.append({"name": fields[0], "memory": fields[1], "driver": fields[2]})
    return gpus


def _ram_gib() -> str:
    try:
        found = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
    except OSError:
        return "?"
    return f"{int(found.group(1)) / 2**20:.1f}" if found else "?"


def host_info() -> dict[str, Any]:
    """CPU, memory, Python, package versions, date, load average and the GPUs of ``nvidia-smi``; imports nothing.

    ``info["slug"]`` names the machine in results files: the first GPU's name, else ``cpu-<model>-<cores>c``.
    """
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "ram_gib": _ram_gib(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?",
        "packages": {name: package_version(name) for name in PACKAGES},
    }
    gpus = nvidia_smi_gpus()
    if gpus:
        info["gpus"] = gpus
    info["slug"] = slug(gpus[0]["name"]) if gpus else f"cpu-{slug(info['cpu'])}-{info['cores']}c"
    return info


def machine_info(device: Any) -> dict[str, str]:
    """CPU, memory, versions, date and load average, plus the GPU and its settings when ``device`` is CUDA.

    ``info["slug"]`` names the machine in results files: the GPU's name, else ``cpu-<model>-<cores>c``.
    """
    import torch

    info = {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "lightning": package_version("lightning"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?",
        "ram_gib": _ram_gib(),
    }
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
