"""What the numbers were measured on: CPU, GPU, driver and library versions."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

from prunekit.bench.memory import gpu_description

# Distributions whose versions change results; read from package metadata (importing tensorrt
# just to print its version costs seconds and can fail on a broken install).
LIBRARIES = (
    "prunekit",
    "torch",
    "torchvision",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "tensorrt",
    "numpy",
    "pycocotools",
)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# CPU features INT8 speed depends on: AVX2 (no 8-bit dot product), AVX-512, VNNI (8-bit dot
# products: ONNX Runtime's fast INT8 path), AMX (Sapphire Rapids tile units)
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")


def cpu_isa() -> dict[str, bool]:
    """Which of :data:`ISA_FLAGS` this CPU reports (/proc/cpuinfo; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return {flag: flag in have for flag in ISA_FLAGS}
    except OSError:
        pass
    return {}


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def describe_machine() -> dict[str, Any]:
    """A JSON-safe description of this host; ``device`` is a one-line summary for report titles."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    gpus = gpu_description()
    torch_threads = None
    if "torch" in sys.modules:
        torch_threads = sys.modules["torch"].get_num_threads()
    providers = None
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except Exception:  # noqa: BLE001 - not installed / broken: simply not listed
        pass
    cpu = cpu_model()
    device = f"{gpus[0]['name']} + {cpu}" if gpus else f"CPU {cpu} ({usable} cores)"
    return {
        "device": device,
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_isa": cpu_isa(),
        "cpu_usable": usable,
        "memory_bytes": mem,
        "torch_threads": torch_threads,
        "gpus": gpus,
        "onnxruntime_providers": providers,
        "libraries": library_versions(),
    }
