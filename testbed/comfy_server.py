"""Start a headless ComfyUI on the CPU for the tests, and talk to it over HTTP (standard library only).

`ComfyServer(comfy_path, base_dir, python).start()` runs

    python main.py --cpu --listen 127.0.0.1 --port <free port> --base-directory <base_dir>
                   --disable-auto-launch <no-network flag> [--disable-assets]

in its own process group, with its log in <base_dir>/comfyui.log, and waits for
/system_stats. `stop()` ends exactly that process group (SIGTERM, then SIGKILL).

Flags that only some ComfyUI versions have are passed after asking that ComfyUI
(`main.py --help`; an unknown flag would stop it): the no-network flag is `--offline`
where it exists (newer versions keep `--disable-api-nodes` as a deprecated alias of it),
else `--disable-api-nodes`; `--disable-assets` where ComfyUI has an assets database
that is on by default.
"""
from __future__ import annotations

import functools
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from typing import Any


class ServerError(RuntimeError):
    pass


@functools.lru_cache(maxsize=None)
def offered_flags(comfy_path: str, python: str) -> frozenset[str]:
    """The command-line flags this ComfyUI's main.py accepts (from its --help)."""
    done = subprocess.run([python, "main.py", "--help"], cwd=comfy_path, capture_output=True, text=True,
                          timeout=120)
    if done.returncode:
        raise ServerError(f"`main.py --help` failed with code {done.returncode}:\n{done.stderr[-2000:]}")
    return frozenset(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", done.stdout))


def version_flags(offered: frozenset[str]) -> list[str]:
    """No network, and no assets database, in the spelling this ComfyUI understands."""
    flags = ["--offline" if "--offline" in offered else "--disable-api-nodes"]
    if "--disable-assets" in offered:
        flags.append("--disable-assets")
    return flags


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, comfy_path: str, base_dir: str, python: str, extra_args: tuple[str, ...] = ()):
        self.comfy_path = comfy_path
        self.base_dir = base_dir
        self.python = python
        self.extra_args = extra_args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(base_dir, "comfyui.log")
        self.process: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex

    # ---- process

    def start(self, timeout: float = 240.0) -> "ComfyServer":
        command = [self.python, "-u", "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                   "--base-directory", self.base_dir, "--disable-auto-launch",
                   *version_flags(offered_flags(self.comfy_path, self.python)), *self.extra_args]
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=self.comfy_path, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise ServerError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return "(no log)"

    # ---- HTTP

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict) -> tuple[int, Any]:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def queue(self, prompt: dict) -> tuple[int, Any]:
        """POST /prompt; returns (HTTP status, answer): 200 with prompt_id, or 400 with node_errors."""
        return self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        """Queue `prompt` and wait for its history entry; raise ServerError when it is refused."""
        status, answer = self.queue(prompt)
        if status != 200:
            raise ServerError(f"prompt refused (HTTP {status}): {json.dumps(answer)[:2000]}")
        return self.wait(answer["prompt_id"], timeout)

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(f"ComfyUI died while running the prompt:\n{self.log_tail()}")
            time.sleep(0.25)
        self.post("/interrupt", {})
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")


def execution_error(entry: dict) -> dict | None:
    """The 'execution_error' message of a history entry, or None."""
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_error":
            return data
    return None


def output_images(entry: dict, base_dir: str) -> list[str]:
    """Paths of the images the prompt's output nodes wrote (type 'output' only)."""
    paths = []
    for output in entry.get("outputs", {}).values():
        for image in output.get("images", []):
            if image.get("type") == "output":
                paths.append(os.path.join(base_dir, "output", image.get("subfolder", ""), image["filename"]))
    return paths
