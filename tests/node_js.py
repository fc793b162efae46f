"""Run the pure JavaScript modules of web/lib under Node.js, for the JS-vs-Python parity tests."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

WEB_LIB = Path(__file__).resolve().parent.parent / "web" / "lib"
NODE = shutil.which("node")

requires_node = pytest.mark.skipif(
    NODE is None, reason="`node` not found: the JS-vs-Python parity tests need Node.js >= 18 on PATH")


def run_js(module: str, body: str, data: Any) -> Any:
    """Run `body` under node with `lib` = web/lib/<module> exports and `data` = the JSON `data`.

    `body` is the body of a function whose return value is sent back as JSON.
    """
    url = (WEB_LIB / module).as_uri()
    script = (
        f'import * as lib from "{url}";\n'
        'import { readFileSync } from "node:fs";\n'
        'const data = JSON.parse(readFileSync(0, "utf8"));\n'
        f"const result = (() => {{\n{body}\n}})();\n"
        "process.stdout.write(JSON.stringify(result));\n"
    )
    done = subprocess.run([NODE, "--input-type=module", "-e", script], input=json.dumps(data),
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise AssertionError(f"node failed ({done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout)
