"""What the bench scripts share: the device's name and where and how their results are written."""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time

from ctrlora_core.files import write_json

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


def ensure_fake_models(comfyui: str) -> None:
    """The random-weight full-size models the ComfyUI benches load (written once, then cached)."""
    from testbed import fake_models

    if fake_models.missing_files(fake_models.cache_dir()):
        subprocess.run([sys.executable, "-m", "testbed.fake_models"], check=True,
                       env=dict(os.environ, COMFYUI_PATH=comfyui))


def print_result(result: dict) -> None:
    """How a bench's measuring child process hands its result to the parent (`child_result`)."""
    print("RESULT " + json.dumps(result), flush=True)


def child_result(command: list[str], what: str, env: dict | None = None) -> dict:
    """Run a measuring child process (each case in a fresh process) and return what it printed with
    `print_result`; exit with its output's tail when it failed."""
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"{what} failed (exit status {done.returncode}; -9: killed, e.g. out of memory):\n"
                 f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def write_report(path: str, report: dict) -> None:
    """Write a bench's JSON report atomically (an interrupted bench leaves the last good file) and say where."""
    write_json(path, report)
    print(f"wrote {path}")


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
