"""What the bench scripts share: the device's name and where its results go."""
from __future__ import annotations

import os
import platform
import re
import time

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_label(gpu: bool) -> str:
    """The GPU's name (CUDA device 0), or the CPU's model name and core count."""
    if gpu:
        import torch

        return torch.cuda.get_device_name(0)
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    return platform.processor() or "cpu"


def results_path(bench: str, gpu: bool) -> str:
    """bench/results/<bench>_cpu.json, or <bench>_<gpu name>.json (e.g. ..._nvidia-h100-80gb-hbm3.json)."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_label(True).lower()).strip("-") if gpu else "cpu"
    return os.path.join(RESULTS_DIR, f"{bench}_{slug}.json")


class CpuShare:
    """This process's share of the CPU over the `with` blocks it times: CPU seconds / (wall seconds x threads).

    Near 1: the timed code had its cores; well under 1: other processes took them.
    """

    def __init__(self):
        self.cpu = 0.0
        self.wall = 0.0

    def __enter__(self) -> "CpuShare":
        self._start = (time.process_time(), time.perf_counter())
        return self

    def __exit__(self, *exc) -> None:
        self.cpu += time.process_time() - self._start[0]
        self.wall += time.perf_counter() - self._start[1]

    def value(self, threads: int) -> float:
        return self.cpu / (self.wall * threads) if self.wall else 0.0
