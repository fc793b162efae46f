"""Soak: many prompts through a real ComfyUI server with the pack, every k-th one bad, and its memory.

    COMFYUI_PATH=/path/to/ComfyUI flock /tmp/ctrlora-heavy.lock <python with this pack installed> bench/soak.py \
        [--prompts 50] [--bad-every 10] [--warmup 5] [--python <ComfyUI's python>]

A headless ComfyUI (CPU, loopback; testbed/comfy_server.py) runs with the pack and the random
full-size models (testbed/fake_models.py: SD1.5, the 1.4 GB CtrLoRA base as an official .ckpt,
rank-128 LoRAs). Every prompt is the dental single-condition example workflow at 64x64 with one
step and a new seed. Prompt n is bad when n is a multiple of --bad-every; the bad ones cycle
through:

  wrong_kind     the base file picked in Load CtrLoRA LoRA (refused from its key table)
  other_base     a LoRA made for another (smaller) base (refused by Apply CtrLoRA from its header)
  missing_file   a LoRA name that is not in the folder (ComfyUI refuses the prompt: value_not_in_list)
  out_of_range   a condition image bicubic-upscaled by core Image Scale, which overshoots [0, 1]
                 (refused by CtrLoRA Condition)
  no_conditions  Apply CtrLoRA with no conditions connected (a graph cannot carry an empty list;
                 ComfyUI refuses the prompt: required_input_missing)

Memory is the server process's: its peak during each prompt (VmHWM, reset through
/proc/PID/clear_refs before the prompt) and its resident size (VmRSS) after each. A spike is
the peak minus the resident size before the prompt. Growth compares the resident size after
the warm-up prompts with the one after the last prompt, each read after ComfyUI's own garbage
collection (it runs at most every 10 s after a prompt, so the soak waits 11 s there).

Targets: every good prompt succeeds, every bad one is refused with its expected named error,
the server is alive (and runs one more good prompt), growth <= 2 %, spike of a refused prompt
<= 100 MiB. Writes bench/results/soak_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

from bench_device import device_label, ensure_fake_models, results_path, write_report
from testbed import fake_models
from testbed.comfy_base_dir import make_base_directory
from testbed.comfy_host import PACK_ROOT
from testbed.comfy_server import ComfyServer, execution_error
from testbed.workflow_api import slots_from_object_info, to_api

WORKFLOW = os.path.join(PACK_ROOT, "example_workflows", "dental_single_condition.json")
BAD_KINDS = ("wrong_kind", "other_base", "missing_file", "out_of_range", "no_conditions")
MIB = 2**20
TARGETS = {"growth_percent": 2.0, "refused_spike_mib": 100.0}
GC_SETTLE_S = 11.0  # ComfyUI collects garbage at most every 10 s after a prompt


def server_memory(pid: int, field: str) -> int:
    """VmRSS / VmHWM of the server process in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def node_of(prompt: dict, class_type: str) -> str:
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


def base_prompt(server: ComfyServer, size: int, steps: int) -> dict:
    """The example workflow in API form, at `size` px and `steps` steps."""
    object_info = server.get("/object_info")
    with open(WORKFLOW) as f:
        prompt = to_api(json.load(f), lambda node_type: slots_from_object_info(object_info[node_type]))
    prompt[node_of(prompt, "EmptyLatentImage")]["inputs"].update(width=size, height=size, batch_size=1)
    prompt[node_of(prompt, "KSampler")]["inputs"]["steps"] = steps
    prompt[node_of(prompt, "SaveImage")]["inputs"]["filename_prefix"] = "soak"
    return prompt


def make_prompt(good: dict, kind: str, seed: int) -> tuple[dict, str, str]:
    """(prompt, node expected to refuse it, expected error text) for `kind` ('good' or a BAD_KINDS name)."""
    prompt = json.loads(json.dumps(good))
    prompt[node_of(prompt, "KSampler")]["inputs"]["seed"] = seed
    lora, condition, apply = (node_of(prompt, t) for t in ("CtrLoRALoRALoader", "CtrLoRACondition", "CtrLoRAApply"))
    if kind == "good":
        return prompt, "", ""
    if kind == "wrong_kind":
        prompt[lora]["inputs"]["lora_name"] = fake_models.BASE
        return prompt, lora, "this is a CtrLoRA base ControlNet file, but a CtrLoRA condition LoRA was expected"
    if kind == "other_base":
        prompt[lora]["inputs"]["lora_name"] = fake_models.MISMATCHED_LORA
        return prompt, apply, "made for a different base"
    if kind == "missing_file":
        prompt[lora]["inputs"]["lora_name"] = "not_there.safetensors"
        return prompt, lora, "value_not_in_list"
    if kind == "out_of_range":
        prompt["soak_scale"] = {"class_type": "ImageScale", "inputs": {
            "image": prompt[condition]["inputs"]["image"], "upscale_method": "bicubic", "width": 192, "height": 160,
            "crop": "disabled"}}
        prompt[condition]["inputs"]["image"] = ["soak_scale", 0]
        return prompt, condition, "values must be in [0, 1]"
    if kind == "no_conditions":
        del prompt[apply]["inputs"]["conditions"]
        return prompt, apply, "required_input_missing"
    raise ValueError(kind)


def run_one(server: ComfyServer, pid: int, prompt: dict, expected_node: str, expected_text: str) -> dict:
    """Queue one prompt and wait for it; its outcome, error and the server's memory around it."""
    rss_before = server_memory(pid, "VmRSS")
    reset_peak(pid)
    start = time.monotonic()
    status, answer = server.queue(prompt)
    record: dict = {"http_status": status}
    node_errors = (answer or {}).get("node_errors") or {}
    if node_errors:  # refused by ComfyUI's validation (with 200 when another output is still valid)
        error = node_errors.get(expected_node) or next(iter(node_errors.values()))
        first = error["errors"][0]
        record["error"] = {"node": expected_node if expected_node in node_errors else next(iter(node_errors)),
                           "type": first["type"], "message": first.get("details") or first["message"]}
    if status == 200:
        entry = server.wait(answer["prompt_id"])
        failed = execution_error(entry)
        if failed:
            record["error"] = {"node": failed["node_id"], "type": failed["exception_type"],
                               "message": failed["exception_message"].strip()}
        elif not node_errors:
            record["ok"] = entry["status"]["status_str"] == "success"
    record["seconds"] = round(time.monotonic() - start, 2)
    record["rss_before_mib"] = round(rss_before / MIB, 1)
    record["peak_mib"] = round(server_memory(pid, "VmHWM") / MIB, 1)
    record["rss_after_mib"] = round(server_memory(pid, "VmRSS") / MIB, 1)
    record["spike_mib"] = round(record["peak_mib"] - record["rss_before_mib"], 1)
    if expected_node:
        error = record.get("error") or {}
        text = f"{error.get('type', '')} {error.get('message', '')}"
        record["refused_as_expected"] = error.get("node") == expected_node and expected_text in text
    return record


def settled_rss(pid: int) -> float:
    """Resident MiB after ComfyUI's next garbage collection."""
    time.sleep(GC_SETTLE_S)
    return round(server_memory(pid, "VmRSS") / MIB, 1)


def comfyui_version(comfy_path: str) -> str:
    namespace: dict = {}
    try:
        with open(os.path.join(comfy_path, "comfyui_version.py")) as f:
            exec(f.read(), namespace)  # a one-line generated file: __version__ = "x.y.z"
    except OSError:
        return "unknown"
    return namespace.get("__version__", "unknown")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout ($COMFYUI_PATH)")
    parser.add_argument("--python", default=os.environ.get("COMFYUI_PYTHON", sys.executable),
                        help="Python that runs the server (default $COMFYUI_PYTHON, else this one)")
    parser.add_argument("--prompts", type=int, default=50, help="prompts to queue (default 50)")
    parser.add_argument("--bad-every", type=int, default=10, help="every k-th prompt is bad (default 10)")
    parser.add_argument("--warmup", type=int, default=5, help="prompts before the growth reference (default 5)")
    parser.add_argument("--size", type=int, default=64, help="image size in px (default 64)")
    parser.add_argument("--steps", type=int, default=1, help="sampling steps (default 1)")
    parser.add_argument("--out", default=results_path("soak", gpu=False), help="result JSON (default %(default)s)")
    args = parser.parse_args()
    if not args.comfyui:
        sys.exit("set COMFYUI_PATH (or --comfyui) to a ComfyUI checkout")
    if not 0 < args.warmup < args.bad_every <= args.prompts:
        sys.exit("need 0 < --warmup < --bad-every <= --prompts (the warm-up prompts are all good)")

    ensure_fake_models(args.comfyui)
    base_dir = tempfile.mkdtemp(prefix="ctrlora-soak-")
    make_base_directory(base_dir, fake_models.cache_dir())
    server = ComfyServer(args.comfyui, base_dir, args.python).start()
    records: list[dict] = []
    try:
        pid = server.process.pid
        good = base_prompt(server, args.size, args.steps)
        rss_warm = None
        for n in range(1, args.prompts + 1):
            kind = BAD_KINDS[(n // args.bad_every - 1) % len(BAD_KINDS)] if n % args.bad_every == 0 else "good"
            prompt, node, text = make_prompt(good, kind, seed=1000 + n)
            record = {"n": n, "kind": kind, **run_one(server, pid, prompt, node, text)}
            records.append(record)
            verdict = "ok" if record.get("ok") else ("refused" if record.get("refused_as_expected") else "FAILED")
            print(f"{n:3d} {kind:<13} {verdict:<8} {record['seconds']:6.1f} s  rss {record['rss_after_mib']:8.1f} MiB"
                  f"  spike {record['spike_mib']:7.1f} MiB" + (f"  [{record['error']['message'].splitlines()[0][:90]}]"
                                                               if "error" in record else ""), flush=True)
            if n == args.warmup:
                rss_warm = settled_rss(pid)
                print(f"    resident after warm-up (settled): {rss_warm:.1f} MiB", flush=True)
        rss_end = settled_rss(pid)
        final = run_one(server, pid, make_prompt(good, "good", seed=999)[0], "", "")
        alive = server.process.poll() is None and bool(server.get("/system_stats")) and bool(final.get("ok"))
    finally:
        server.stop()

    good_records = [r for r in records if r["kind"] == "good"]
    bad_records = [r for r in records if r["kind"] != "good"]
    executed_refusals = [r for r in bad_records if r["http_status"] == 200]
    summary = {
        "good_ok": sum(bool(r.get("ok")) for r in good_records),
        "good_failed": sum(not r.get("ok") for r in good_records),
        "bad_refused_with_named_error": sum(bool(r.get("refused_as_expected")) for r in bad_records),
        "bad_total": len(bad_records),
        "server_alive": alive,
        "rss_after_warmup_mib": rss_warm,
        "rss_end_mib": rss_end,
        "growth_percent": round(100.0 * (rss_end - rss_warm) / rss_warm, 2),
        "largest_spike_refused_mib": max((r["spike_mib"] for r in bad_records), default=0.0),
        "largest_spike_refused_executed_mib": max((r["spike_mib"] for r in executed_refusals), default=0.0),
        "largest_spike_good_mib": max(r["spike_mib"] for r in good_records),
        "refused_spikes_by_kind_mib": {r["kind"]: r["spike_mib"] for r in bad_records},
    }
    met = {
        "no_failed_good_prompt": summary["good_failed"] == 0,
        "every_bad_prompt_refused_with_named_error": summary["bad_refused_with_named_error"] == len(bad_records),
        "server_alive": alive,
        "growth_percent <= 2": summary["growth_percent"] <= TARGETS["growth_percent"],
        "refused_spike_mib <= 100": summary["largest_spike_refused_mib"] <= TARGETS["refused_spike_mib"],
    }
    for key, value in summary.items():
        print(f"{key:<38} {value}")
    for key, value in met.items():
        print(f"target {key:<45} {'met' if value else 'MISSED'}")
    report = {"bench": "soak", "device": device_label(False), "comfyui": comfyui_version(args.comfyui),
              "python": platform.python_version(), "prompts": args.prompts, "bad_every": args.bad_every,
              "warmup": args.warmup, "size": args.size, "steps": args.steps, "bad_kinds": list(BAD_KINDS),
              "targets": TARGETS, "met": met, "summary": summary, "per_prompt": records,
              "memory_note": ("server process: spike = VmHWM during the prompt (reset before it through "
                              "/proc/PID/clear_refs) minus VmRSS before it; growth = settled VmRSS after the "
                              "last prompt vs after the warm-up prompts (each read 11 s after the prompt, after "
                              "ComfyUI's own garbage collection)")}
    write_report(args.out, report)
    sys.exit(0 if all(met.values()) else 1)


if __name__ == "__main__":
    main()
