"""Per-step time and peak memory of sampling inside ComfyUI with CtrLoRA vs core ControlNets.

    COMFYUI_PATH=/path/to/ComfyUI <ComfyUI's python> bench/comfy_step.py [--res 256] [--steps 6] [--device cpu|gpu]

ComfyUI is used as a library (its own loader, CLIP, ControlNet and KSampler code: the
core node classes and comfy.sample.sample), with the pack imported the way ComfyUI
imports it. Full-size random-weight models from testbed/fake_models.py
(SD1.5 checkpoint, a classic SD1.5 ControlNet, the CtrLoRA base, rank-128 LoRAs).

Cases (memory: each case alone in its own process; step time: all cases in one process,
interleaved round by round, so a busy shared machine slows them alike):
  txt2img       no control (the baseline the control memory is measured from)
  controlnet    (a) one core ControlNet (Apply ControlNet (Advanced))
  ctrlora1      (b) Apply CtrLoRA with one LoRA (weights merged: the single-condition fast path)
  ctrlora3      (c) Apply CtrLoRA with three conditions (one base copy, one batched pass)
  controlnet3   three chained core ControlNets, three separate model copies (what (c) replaces)
A step is timed from ComfyUI's sampler callback, in --repeats rounds; in each round every
case gets a 2-step warm-up run, then its timed run, in which steps 2..N are averaged (loading,
merging or unmerging LoRA weights and the hint's VAE encoding are not counted). Each case's
fastest run is reported (all runs are in the JSON). Round-robin matters on CPU: see the
README's Benchmarks section for what changes when the three-condition case runs in between.
Memory, counted from after the checkpoint is loaded and the prompts encoded: the peak
(VmHWM on the CPU, torch.cuda.max_memory_allocated on a GPU; includes reading the control
files) and the resident memory after sampling; the control's share is the case's value
minus txt2img's. Also the bytes of the control weights the case holds (parameters +
stacked adapters).

Targets (printed with the ratios): (b)/(a) step <= 1.03; (c) resident control memory <= 0.45 x
controlnet3's; (c) step <= 0.8 x controlnet3's. Writes bench/results/comfy_step_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from bench_device import device_label, results_path
from testbed import fake_models
from testbed.comfy_host import import_comfy, load_pack

CASES = ("txt2img", "controlnet", "ctrlora1", "ctrlora3", "controlnet3")
PROMPT = "a 3D dental model of upper teeth, front view, dental photography"
NEGATIVE = "blurry, low quality"


def process_memory(field: str) -> int:
    """VmRSS / VmHWM of this process in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak(device: str) -> None:
    """Start peak measurement here (after the checkpoint is loaded and the prompts encoded)."""
    if device == "gpu":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS


def setup_comfy(comfy_path: str, device: str):
    """ComfyUI's `nodes` module and this pack, imported as ComfyUI imports custom nodes."""
    import_comfy(comfy_path, cpu=device == "cpu")
    import nodes as comfy_nodes  # ComfyUI's own

    return comfy_nodes, load_pack()


class Session:
    """ComfyUI with the checkpoint loaded and the prompts encoded; builds each case's conditioning."""

    def __init__(self, args: argparse.Namespace):
        import torch

        self.comfy_nodes, pack = setup_comfy(args.comfyui, args.device)
        self.pack_nodes = pack.NODE_CLASS_MAPPINGS
        import comfy.model_management as mm
        import comfy.sample
        import folder_paths

        self.mm, self.sample_fn = mm, comfy.sample
        self.files = fake_models
        cache = fake_models.cache_dir()
        links = tempfile.mkdtemp(prefix="comfy-step-cn-")
        for i in range(3):  # three names: ComfyUI loads three separate copies
            os.symlink(os.path.join(cache, fake_models.CONTROLNET), os.path.join(links, f"cn_{i}.safetensors"))
        folder_paths.add_model_folder_path("checkpoints", cache)
        folder_paths.add_model_folder_path("controlnet", links)
        folder_paths.add_model_folder_path("ctrlora", cache)

        nodes = self.comfy_nodes
        self.model, clip, self.vae = nodes.CheckpointLoaderSimple().load_checkpoint(fake_models.CHECKPOINT)[:3]
        self.positive = nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
        self.negative = nodes.CLIPTextEncode().encode(clip, NEGATIVE)[0]
        generator = torch.Generator().manual_seed(0)
        self.hints = [torch.rand(1, args.res, args.res, 3, generator=generator) for _ in range(3)]
        self.latent = nodes.EmptyLatentImage().generate(args.res, args.res, 1)[0]["samples"]
        self.noise = comfy.sample.prepare_noise(self.latent, 0)
        mm.load_models_gpu([self.model])

    def conditioning(self, case: str) -> tuple[list, list, int]:
        """(positive, negative, bytes of control weights) for `case`."""
        positive, negative, control_bytes = self.positive, self.negative, 0
        if case.startswith("controlnet"):
            for i in range(3 if case == "controlnet3" else 1):
                control = self.comfy_nodes.ControlNetLoader().load_controlnet(f"cn_{i}.safetensors")[0]
                positive, negative = self.comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
                    positive, negative, control, self.hints[i], 1.0, 0.0, 1.0)
                control_bytes += self.mm.module_size(control.control_model)
        elif case.startswith("ctrlora"):
            nodes = self.pack_nodes
            base = nodes["CtrLoRABaseLoader"]().load(self.files.BASE)["result"][0]
            conditions = None
            count = 3 if case == "ctrlora3" else 1
            names = (self.files.DENTAL_LORA, self.files.DEPTH_LORA, self.files.SEG_LORA)
            for name, hint in list(zip(names, self.hints))[:count]:
                lora = nodes["CtrLoRALoRALoader"]().load(name, 1.0)["result"][0]
                conditions = nodes["CtrLoRACondition"]().add(lora, hint, 1.0 / count, conditions)[0]
            positive, negative = nodes["CtrLoRAApply"]().apply(positive, negative, base, conditions, self.vae,
                                                               1.0, 0.0, 1.0)
            control = positive[0][1]["control"]
            control_bytes = self.mm.module_size(base.module) + (0 if control.merge_key else control.stack.numel() * 4)
        return positive, negative, control_bytes

    def sample(self, positive: list, negative: list, steps: int) -> list[float]:
        """Sample; return the duration of steps 2..N (step 1 loads models and encodes hints)."""
        stamps: list[float] = []
        self.sample_fn.sample(self.model, self.noise, steps, 7.5, "ddim", "ddim_uniform", positive, negative,
                              self.latent, callback=lambda *_: stamps.append(time.perf_counter()),
                              disable_pbar=True, seed=0)
        return [b - a for a, b in zip(stamps, stamps[1:])]


def measure_memory(case: str, args: argparse.Namespace) -> dict:
    """Memory of one case, alone in this process, counted from after the checkpoint is loaded."""
    session = Session(args)
    start_rss = process_memory("VmRSS")
    reset_peak(args.device)
    positive, negative, control_bytes = session.conditioning(case)
    session.sample(positive, negative, 2)
    if args.device == "gpu":
        import torch

        peak, resident = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
    else:
        peak, resident = process_memory("VmHWM") - start_rss, process_memory("VmRSS") - start_rss
    return {"case": case, "peak_bytes": peak, "resident_bytes": resident, "control_weight_bytes": control_bytes}


def measure_time(cases: list[str], args: argparse.Namespace) -> dict:
    """Step times of all cases in one process, interleaved round by round (fair on a shared machine)."""
    import torch

    session = Session(args)
    conditionings = {case: session.conditioning(case)[:2] for case in cases}
    runs: dict[str, list[list[float]]] = {case: [] for case in cases}
    for _ in range(args.repeats):
        for case in cases:
            session.sample(*conditionings[case], 2)  # warm-up: loads and (un)merges LoRA weights for this case
            runs[case].append(session.sample(*conditionings[case], args.steps))
    out = {}
    for case, case_runs in runs.items():
        means = [sum(r) / len(r) for r in case_runs]
        out[case] = {"s_per_step": min(means), "s_per_step_runs": means, "steps": case_runs}
    return {"cases": out, "torch": torch.__version__, "threads": torch.get_num_threads()}


def subprocess_json(mode: list[str], args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, *mode, "--comfyui", args.comfyui, "--device", args.device,
               "--res", str(args.res), "--steps", str(args.steps), "--repeats", str(args.repeats),
               "--cases", *args.cases]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"{' '.join(mode)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def ratio(results: dict, a: str, b: str, key: str) -> float | None:
    if a in results and b in results and results[b][key]:
        return results[a][key] / results[b][key]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout ($COMFYUI_PATH)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--res", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6, help="steps of the timed run (steps 2..N are averaged)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the fastest run's mean is reported")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES)
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)  # internal: one case's memory, as JSON
    parser.add_argument("--timing", action="store_true", help=argparse.SUPPRESS)  # internal: all step times
    args = parser.parse_args()
    if not args.comfyui:
        sys.exit("set COMFYUI_PATH (or --comfyui) to a ComfyUI checkout")
    if args.memory_case:
        print("RESULT " + json.dumps(measure_memory(args.memory_case, args)))
        return
    if args.timing:
        print("RESULT " + json.dumps(measure_time(args.cases, args)))
        return

    if fake_models.missing_files(fake_models.cache_dir()):
        subprocess.run([sys.executable, "-m", "testbed.fake_models"], check=True,
                       env=dict(os.environ, COMFYUI_PATH=args.comfyui))
    load_before = os.getloadavg()
    results = {case: subprocess_json(["--memory-case", case], args) for case in args.cases}
    timing = subprocess_json(["--timing"], args)
    for case, r in results.items():
        r.update(timing["cases"][case])
        print(f"{case:<12} {r['s_per_step']:7.3f} s/step   peak +{r['peak_bytes'] / 2**30:5.2f} GiB   resident "
              f"+{r['resident_bytes'] / 2**30:5.2f} GiB   control weights {r['control_weight_bytes'] / 2**30:5.2f} GiB",
              flush=True)
    if "txt2img" in results:
        for r in results.values():
            r["control_peak_bytes"] = r["peak_bytes"] - results["txt2img"]["peak_bytes"]
            r["control_resident_bytes"] = r["resident_bytes"] - results["txt2img"]["resident_bytes"]
    ratios = {
        "b_over_a_step (target <= 1.03)": ratio(results, "ctrlora1", "controlnet", "s_per_step"),
        "c_over_three_chained_step (target <= 0.8)": ratio(results, "ctrlora3", "controlnet3", "s_per_step"),
        "c_over_three_copies_control_resident_memory (target <= 0.45)":
            ratio(results, "ctrlora3", "controlnet3", "control_resident_bytes") if "txt2img" in results else None,
        "c_over_three_copies_control_peak_memory":
            ratio(results, "ctrlora3", "controlnet3", "control_peak_bytes") if "txt2img" in results else None,
        "c_over_three_copies_control_weights": ratio(results, "ctrlora3", "controlnet3", "control_weight_bytes"),
        "a_over_txt2img_step": ratio(results, "controlnet", "txt2img", "s_per_step"),
    }
    for name, value in ratios.items():
        print(f"{name:<58} {'n/a' if value is None else f'{value:.3f}'}")
    gpu = args.device == "gpu"
    device = device_label(gpu)
    report = {"bench": "comfy_step", "device": device, "torch": timing["torch"], "threads": timing["threads"],
              "res": args.res, "batch": 1, "cfg_batch": 2,
              "steps_timed": args.steps - 1, "repeats": args.repeats, "sampler": "ddim / ddim_uniform, cfg 7.5", "lora_rank": 128,
              "load_average_before_after": [load_before, os.getloadavg()], "results": results, "ratios": ratios,
              "memory_note": ("measured from after the checkpoint is loaded: peak = VmHWM (CPU) or CUDA max "
                              "allocated (GPU) minus the start; resident = VmRSS / CUDA allocated after sampling "
                              "minus the start; control_* = the case's value minus txt2img's (peak includes "
                              "reading the model files)")}
    out = results_path("comfy_step", gpu)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(out)


if __name__ == "__main__":
    main()
