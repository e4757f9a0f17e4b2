"""Shared bits of the benchmarks: the machine description, a table printer, the JSON result file."""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine(device: str = "cpu") -> dict:
    import torch
    info = {"cpu": cpu_model(), "cores": cores(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": device, "python": platform.python_version()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def resolve(device: str) -> str:
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def print_table(title: str, info: dict, rows: list[tuple[str, object, str]]) -> None:
    """rows: (name, value, note)."""
    print(f"\n== {title} ==")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    width = max(len(r[0]) for r in rows) if rows else 10
    for name, value, note in rows:
        v = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"  {name:<{width}}  {v:>12}  {note}")


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"figures written to {path.relative_to(ROOT)}")
    return path
