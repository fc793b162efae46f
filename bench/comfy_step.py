"""Per-step time and memory of sampling inside ComfyUI with CtrLoRA vs core ControlNets.

    COMFYUI_PATH=/path/to/ComfyUI <ComfyUI's python> bench/comfy_step.py [--res 256] [--steps 6] [--device cpu|gpu]

ComfyUI is used as a library (its own loader, CLIP, ControlNet and KSampler code: the
core node classes and comfy.sample.sample), with the pack imported the way ComfyUI
imports it. Full-size random-weight models from testbed/fake_models.py
(SD1.5 checkpoint, a classic SD1.5 ControlNet, the CtrLoRA base, rank-128 LoRAs).

Cases (batch B images of one prompt; CFG doubles the rows):
  txt2img         no control (the baseline the control memory is measured from)
  controlnet      (a) one core ControlNet (Apply ControlNet (Advanced))
  ctrlora1        (b) Apply CtrLoRA with one LoRA (weights merged: the single-condition fast path)
  ctrlora3        (c) Apply CtrLoRA with three conditions (one base copy, one batched pass)
  controlnet3     three chained core ControlNets, three separate model copies (what (c) replaces)
  controlnet_b4   (a) at B = 4
  ctrlora1_b4     (b) at B = 4 (the base runs on the 2 distinct rows of the 8)
  ctrlora1_rerun  (b), timing the second run of the same graph with a new seed (residuals from
                  the residual cache), and txt2img in the same process, the two taking turns
Every case runs in a fresh process of its own (memory and time), --rounds times, the cases
taking turns round by round (so a busy shared machine slows them alike). In a process: the
checkpoint is loaded and the prompts encoded, then a 2-step run measures memory, then
--repeats times a 2-step warm-up and the timed run, whose steps 2..N are averaged (loading,
merging LoRA weights and the condition's VAE encoding are in step 1). The residual cache is
emptied before each timed run, except in ctrlora1_rerun, whose timed runs follow a full run of
the same graph with seed 0; each of its repeats also times a txt2img run (first or second in
turn), and the re-run target compares the two in that process: between processes the same UNet
step differs by more than the 4 ms a step that the cached control costs (the process's heap
history and the hour's drift; a profile of both runs in one process finds the same UNet kernels
with the same times). A case's step time is the median over its processes of each
process's fastest run (one lucky or disturbed process cannot decide a ratio, as the fastest
run of all could; with --rounds 1 it is that process's fastest run; every run is in the JSON).
Memory, counted from after the checkpoint is loaded and the prompts encoded: the peak
(VmHWM on the CPU, torch.cuda.max_memory_allocated on a GPU; includes reading the control
files) and the resident memory after sampling (the residual cache's entries included, also
given alone); the control's share is the case's value minus txt2img's. On the CPU, resident
is read after glibc gave its freed heap back (malloc_trim, before the start too): glibc keeps
freed blocks of the last forward passes, a few hundred MiB that differ by case and by run and
that no model holds; the VmRSS before that is kept as resident_untrimmed_bytes. Also the bytes
of the control weights the case holds (parameters + stacked adapters).

--queue N (default 50): N prompts queued one after the other in one process, each with a
new seed and a new prompt text (so every run adds cache entries: the worst case), Apply
CtrLoRA with one LoRA at --queue-res with a --queue-budget-mb cache; the resident memory after
each prompt shows whether it grows past the cache's budget.

CPU share: the benchmark process's CPU seconds / (wall seconds x torch threads) over the
timed runs; well under 1 means other processes took the cores (figures not comparable).
Targets (printed with the ratios): (b)/(a) step <= 1.03; B = 4 (b)/(a) <= 0.75; re-run
(b)/txt2img <= 1.05; (c) resident control memory <= 0.45 x controlnet3's; (c) step <= 0.8 x
controlnet3's. Writes bench/results/comfy_step_<device>.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import NamedTuple

from bench_device import (CpuShare, child_result, device_label, ensure_fake_models, print_result, results_path,
                          write_report)
from testbed import fake_models
from testbed.comfy_host import import_comfy, load_pack, pack_module

PROMPT = "a 3D dental model of upper teeth, front view, dental photography"
NEGATIVE = "blurry, low quality"


class Case(NamedTuple):
    control: str  # none, controlnet, controlnet3, ctrlora1, ctrlora3
    batch: int = 1
    rerun: bool = False


CASES = {
    "txt2img": Case("none"),
    "controlnet": Case("controlnet"),
    "ctrlora1": Case("ctrlora1"),
    "ctrlora3": Case("ctrlora3"),
    "controlnet3": Case("controlnet3"),
    "controlnet_b4": Case("controlnet", batch=4),
    "ctrlora1_b4": Case("ctrlora1", batch=4),
    "ctrlora1_rerun": Case("ctrlora1", rerun=True),
}
RATIOS = {  # name: (case, its measure, over case, its measure, target)
    "b_over_a_step": ("ctrlora1", "s_per_step", "controlnet", "s_per_step", 1.03),
    "batch4_ctrlora1_over_controlnet": ("ctrlora1_b4", "s_per_step", "controlnet_b4", "s_per_step", 0.75),
    "rerun_ctrlora1_over_txt2img": ("ctrlora1_rerun", "s_per_step", "ctrlora1_rerun", "txt2img_s_per_step", 1.05),
    "c_over_three_copies_control_resident_memory": ("ctrlora3", "control_resident_bytes",
                                                    "controlnet3", "control_resident_bytes", 0.45),
    "c_over_three_chained_step": ("ctrlora3", "s_per_step", "controlnet3", "s_per_step", 0.8),
    "c_over_three_copies_control_peak_memory": ("ctrlora3", "control_peak_bytes",
                                                "controlnet3", "control_peak_bytes", None),
    "c_over_three_copies_control_weights": ("ctrlora3", "control_weight_bytes",
                                            "controlnet3", "control_weight_bytes", None),
    "c_over_three_copies_control_resident_untrimmed": ("ctrlora3", "control_resident_untrimmed_bytes",
                                                       "controlnet3", "control_resident_untrimmed_bytes", None),
    "rerun_ctrlora1_over_txt2img_separate_processes": ("ctrlora1_rerun", "s_per_step", "txt2img", "s_per_step", None),
    "a_over_txt2img_step": ("controlnet", "s_per_step", "txt2img", "s_per_step", None),
    "b_over_txt2img_step": ("ctrlora1", "s_per_step", "txt2img", "s_per_step", None),
}


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

    def __init__(self, args: argparse.Namespace, batch: int, res: int):
        import torch

        self.comfy_nodes, pack = setup_comfy(args.comfyui, args.device)
        self.pack_nodes = pack.NODE_CLASS_MAPPINGS
        self.residual_cache = pack_module("nodes.residual_cache").SHARED
        import comfy.model_management as mm
        import comfy.sample
        import folder_paths

        self.mm, self.sample_fn = mm, comfy.sample
        self.files = fake_models
        cache = fake_models.cache_dir()
        # held for the process's life (ComfyUI reads the files when a case loads them), removed at exit
        self.controlnet_links = tempfile.TemporaryDirectory(prefix="comfy-step-cn-")
        links = self.controlnet_links.name
        for i in range(3):  # three names: ComfyUI loads three separate copies
            os.symlink(os.path.join(cache, fake_models.CONTROLNET), os.path.join(links, f"cn_{i}.safetensors"))
        folder_paths.add_model_folder_path("checkpoints", cache)
        folder_paths.add_model_folder_path("controlnet", links)
        folder_paths.add_model_folder_path("ctrlora", cache)

        nodes = self.comfy_nodes
        self.model, self.clip, self.vae = nodes.CheckpointLoaderSimple().load_checkpoint(fake_models.CHECKPOINT)[:3]
        self.positive = nodes.CLIPTextEncode().encode(self.clip, PROMPT)[0]
        self.negative = nodes.CLIPTextEncode().encode(self.clip, NEGATIVE)[0]
        generator = torch.Generator().manual_seed(0)
        self.hints = [torch.rand(1, res, res, 3, generator=generator) for _ in range(3)]
        self.latent = nodes.EmptyLatentImage().generate(res, res, batch)[0]["samples"]
        mm.load_models_gpu([self.model])

    def conditioning(self, control: str, positive: list | None = None) -> tuple[list, list, int]:
        """(positive, negative, bytes of control weights) for a case's `control`."""
        positive, negative, control_bytes = positive or self.positive, self.negative, 0
        if control.startswith("controlnet"):
            for i in range(3 if control == "controlnet3" else 1):
                model = self.comfy_nodes.ControlNetLoader().load_controlnet(f"cn_{i}.safetensors")[0]
                positive, negative = self.comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
                    positive, negative, model, self.hints[i], 1.0, 0.0, 1.0)
                control_bytes += self.mm.module_size(model.control_model)
        elif control.startswith("ctrlora"):
            nodes = self.pack_nodes
            base = nodes["CtrLoRABaseLoader"]().load(self.files.BASE)["result"][0]
            conditions = None
            count = 3 if control == "ctrlora3" else 1
            names = (self.files.DENTAL_LORA, self.files.DEPTH_LORA, self.files.SEG_LORA)
            for name, hint in list(zip(names, self.hints))[:count]:
                lora = nodes["CtrLoRALoRALoader"]().load(name, 1.0)["result"][0]
                conditions = nodes["CtrLoRACondition"]().add(lora, hint, 1.0 / count, conditions)[0]
            positive, negative = nodes["CtrLoRAApply"]().apply(positive, negative, base, conditions, self.vae,
                                                               1.0, 0.0, 1.0)
            applied = positive[0][1]["control"]
            control_bytes = self.mm.module_size(base.module) + (0 if applied.merge_key else applied.stack.numel() * 4)
        return positive, negative, control_bytes

    def sample(self, positive: list, negative: list, steps: int, seed: int) -> list[float]:
        """Sample; return the duration of steps 2..N (step 1 loads models and encodes hints)."""
        stamps: list[float] = []
        noise = self.sample_fn.prepare_noise(self.latent, seed)
        self.sample_fn.sample(self.model, noise, steps, 7.5, "ddim", "ddim_uniform", positive, negative,
                              self.latent, callback=lambda *_: stamps.append(time.perf_counter()),
                              disable_pbar=True, seed=seed)
        return [b - a for a, b in zip(stamps, stamps[1:])]

    def memory(self, device: str, start_rss: int) -> tuple[int, int, int]:
        """(peak, resident, resident before the freed heap is given back) bytes since `reset_peak`."""
        if device == "gpu":
            import torch

            allocated = torch.cuda.memory_allocated()
            return torch.cuda.max_memory_allocated(), allocated, allocated
        untrimmed = process_memory("VmRSS") - start_rss
        pack_module("nodes.ctrlora_control").return_freed_heap()
        return process_memory("VmHWM") - start_rss, process_memory("VmRSS") - start_rss, untrimmed


class ControlTimer:
    """Seconds per model call in the outermost `get_control` and in the control networks' forward.

    Installed on the classes (core ControlNet, Apply CtrLoRA's control, their networks) for one
    extra run after the timed ones, since the timing waits for the GPU at every boundary.
    """

    def __init__(self, gpu: bool):
        import torch

        import comfy.cldm.cldm
        import comfy.controlnet

        self.sync = torch.cuda.synchronize if gpu else (lambda: None)
        control_class = pack_module("nodes.ctrlora_control").CtrLoRAControl
        network_class = pack_module("ctrlora_core.controlnet").CtrLoRAControlNet
        self.methods = [(cls, "get_control") for cls in (comfy.controlnet.ControlNet, control_class)]
        self.methods += [(cls, "forward") for cls in (comfy.cldm.cldm.ControlNet, network_class)]
        self.calls: dict[str, list[float]] = {"get_control": [], "forward": []}
        self.depth = 0

    def _wrap(self, method, name: str):
        def timed(*a, **k):
            outermost = name == "forward" or self.depth == 0
            self.depth += name == "get_control"
            self.sync()
            start = time.perf_counter()
            try:
                return method(*a, **k)
            finally:
                self.sync()
                self.depth -= name == "get_control"
                if outermost:
                    self.calls[name].append(time.perf_counter() - start)
        return timed

    def __enter__(self) -> "ControlTimer":
        self.originals = [(cls, name, cls.__dict__[name]) for cls, name in self.methods]
        for cls, name, method in self.originals:
            setattr(cls, name, self._wrap(method, name))
        return self

    def __exit__(self, *exc) -> None:
        for cls, name, method in self.originals:
            setattr(cls, name, method)

    def per_call(self, calls: int) -> dict:
        """Mean seconds per model call over the last `calls` calls (one forward per call for one control)."""
        return {f"{name}_s": sum(times[-calls:]) / calls for name, times in self.calls.items()}


def measure_case(name: str, args: argparse.Namespace) -> dict:
    """Memory and step times of one case, alone in this process."""
    import torch

    case = CASES[name]
    session = Session(args, case.batch, args.res)
    pack_module("nodes.ctrlora_control").return_freed_heap()
    start_rss = process_memory("VmRSS")
    reset_peak(args.device)
    positive, negative, control_bytes = session.conditioning(case.control)
    session.sample(positive, negative, 2, seed=0)
    peak, resident, untrimmed = session.memory(args.device, start_rss)
    cache_bytes = session.residual_cache.nbytes
    runs, txt2img_runs, share = [], [], CpuShare()
    for repeat in range(args.repeats):
        session.sample(positive, negative, 2, seed=0)  # warm-up: loads and (un)merges LoRA weights
        session.residual_cache.clear()
        if case.rerun:
            session.sample(positive, negative, args.steps, seed=0)  # the first run of the graph
        timed = [(runs, positive, negative)]
        if case.rerun:  # txt2img in the same process, first in every other repeat
            timed.append((txt2img_runs, session.positive, session.negative))
            if repeat % 2:
                timed.reverse()
        for into, case_positive, case_negative in timed:
            with share:
                into.append(session.sample(case_positive, case_negative, args.steps, seed=repeat + 1))
    breakdown = None
    if args.breakdown and case.control in ("controlnet", "ctrlora1"):
        session.residual_cache.clear()
        if case.rerun:
            session.sample(positive, negative, args.steps, seed=0)
        with ControlTimer(args.device == "gpu") as timer:
            steps = session.sample(positive, negative, args.steps, seed=args.repeats + 1)
        breakdown = {"step_s": sum(steps) / len(steps), **timer.per_call(len(steps))}
    return {"case": name, "batch": case.batch, "peak_bytes": peak, "resident_bytes": resident,
            "resident_untrimmed_bytes": untrimmed,
            "residual_cache_bytes": cache_bytes, "control_weight_bytes": control_bytes, "steps": runs,
            "txt2img_steps": txt2img_runs,
            "breakdown": breakdown, "cpu_share": share.value(torch.get_num_threads()), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def measure_queue(args: argparse.Namespace) -> dict:
    """Resident memory over `args.queue` prompts, each with a new seed and a new prompt text."""
    import torch

    session = Session(args, 1, args.queue_res)
    nodes = session.comfy_nodes
    held = session.conditioning("ctrlora1")  # keeps the base loaded, as ComfyUI's cache of the loader does
    rss, gpu, cache_bytes = [], [], []
    for prompt in range(args.queue):
        positive = nodes.CLIPTextEncode().encode(session.clip, f"{PROMPT}, variant {prompt}")[0]
        positive, negative, _ = session.conditioning("ctrlora1", positive)
        session.sample(positive, negative, 2, seed=prompt)
        rss.append(process_memory("VmRSS"))
        gpu.append(torch.cuda.memory_allocated() if args.device == "gpu" else 0)
        cache_bytes.append(session.residual_cache.nbytes)
    del held
    half = len(rss) // 2
    return {"prompts": args.queue, "res": args.queue_res, "steps": 2, "budget_bytes": session.residual_cache.budget_bytes,
            "resident_bytes": rss, "gpu_allocated_bytes": gpu, "residual_cache_bytes": cache_bytes,
            "max_cache_bytes": max(cache_bytes), "growth_after_first_bytes": max(rss) - rss[0],
            "growth_second_half_bytes": max(rss[half:]) - rss[half - 1],
            "gpu_growth_after_first_bytes": max(gpu) - gpu[0]}


def subprocess_json(mode: list[str], args: argparse.Namespace, env: dict | None = None) -> dict:
    command = [sys.executable, __file__, "--comfyui", args.comfyui, "--device", args.device,
               "--res", str(args.res), "--steps", str(args.steps), "--repeats", str(args.repeats),
               "--queue", str(args.queue), "--queue-res", str(args.queue_res),
               "--breakdown" if args.breakdown else "--no-breakdown", *mode]  # mode last: it may override
    return child_result(command, " ".join(mode), env)


def step_statistics(processes: list[list[list[float]]]) -> dict:
    """Step times of one case (per process, its timed runs' step durations): the median over the
    processes of each process's fastest run, and the figures behind it."""
    per_process = [[sum(steps) / len(steps) for steps in runs] for runs in processes]
    means = [mean for process in per_process for mean in process]
    fastest = [min(process) for process in per_process if process]
    return {"s_per_step": statistics.median(fastest) if fastest else None, "s_per_step_processes": fastest,
            "s_per_step_fastest": min(means, default=None), "s_per_step_runs": means}


def summarise(name: str, runs: list[dict]) -> dict:
    """One case's rounds: memory from the first, every timed run, the step statistics."""
    out = dict(runs[0])
    out["steps"] = [steps for run in runs for steps in run["steps"]]
    out["txt2img_steps"] = [steps for run in runs for steps in run["txt2img_steps"]]
    out.update(step_statistics([run["steps"] for run in runs]), cpu_share=[run["cpu_share"] for run in runs])
    if out["txt2img_steps"]:
        out.update({f"txt2img_{k}": v for k, v in step_statistics([run["txt2img_steps"] for run in runs]).items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout ($COMFYUI_PATH)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--res", type=int, default=256, help="image size in px (default 256)")
    parser.add_argument("--steps", type=int, default=6, help="steps of the timed run (steps 2..N are averaged)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per process (default 2; 0 = memory only)")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per case, cases taking turns")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES), help="cases to run (all)")
    parser.add_argument("--queue", type=int, default=50, help="prompts of the memory-over-a-queue check (0 = skip)")
    parser.add_argument("--queue-res", type=int, default=128, help="image size of the queue check (default 128)")
    parser.add_argument("--queue-budget-mb", type=float, default=64,
                        help="residual cache budget in the queue check, MiB (default 64: reached within the queue)")
    parser.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                        help="one more run per single-control case with get_control and the control network's "
                             "forward timed (default on)")
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)  # internal: one case, as JSON
    parser.add_argument("--queue-only", action="store_true", help=argparse.SUPPRESS)  # internal: the queue check
    parser.add_argument("--out", help="result JSON (default bench/results/comfy_step_<device>.json; another name for "
                                      "a run of some cases, which would otherwise replace the full run's figures)")
    parser.add_argument("--dry-run", action="store_true", help="check the arguments and print the plan; run nothing")
    args = parser.parse_args()
    if args.dry_run:
        print(f"comfy_step: {args.device}, cases {' '.join(args.cases)}; {args.rounds} rounds x {args.repeats} "
              f"timed runs of {args.steps} steps at {args.res}px; queue check: {args.queue} prompts at "
              f"{args.queue_res}px, cache budget {args.queue_budget_mb:g} MiB; ComfyUI at {args.comfyui}")
        return
    if not args.comfyui:
        sys.exit("set COMFYUI_PATH (or --comfyui) to a ComfyUI checkout")
    if args.case:
        print_result(measure_case(args.case, args))
        return
    if args.queue_only:
        print_result(measure_queue(args))
        return

    ensure_fake_models(args.comfyui)
    load_before = os.getloadavg()
    rounds: dict[str, list[dict]] = {case: [] for case in args.cases}
    for round_ in range(args.rounds):
        for case in args.cases:  # the breakdown's extra run in the first round only
            rounds[case].append(subprocess_json(["--case", case] + (["--no-breakdown"] if round_ else []), args))
    results = {case: summarise(case, runs) for case, runs in rounds.items()}
    if "txt2img" in results:
        for r in results.values():
            r["control_peak_bytes"] = r["peak_bytes"] - results["txt2img"]["peak_bytes"]
            r["control_resident_bytes"] = r["resident_bytes"] - results["txt2img"]["resident_bytes"]
            r["control_resident_untrimmed_bytes"] = (r["resident_untrimmed_bytes"]
                                                     - results["txt2img"]["resident_untrimmed_bytes"])
    for case, r in results.items():
        step = "    n/a" if r["s_per_step"] is None else f"{r['s_per_step']:7.3f}"
        print(f"{case:<15} {step} s/step   peak +{r['peak_bytes'] / 2**30:5.2f} GiB   resident "
              f"+{r['resident_bytes'] / 2**30:5.2f} GiB (cache {r['residual_cache_bytes'] / 2**20:4.0f} MiB)   "
              f"control weights {r['control_weight_bytes'] / 2**30:5.2f} GiB   CPU share "
              f"{min(r['cpu_share']):.2f}", flush=True)
    for case, r in results.items():
        if r.get("txt2img_s_per_step"):
            print(f"{case:<15} {r['txt2img_s_per_step']:7.3f} s/step for txt2img in the same processes")
    for case, r in results.items():
        if r["breakdown"]:
            b = r["breakdown"]
            print(f"{case:<15} per step {b['step_s']:.3f} s: get_control {b['get_control_s']:.3f} s, of which the "
                  f"control network {b['forward_s']:.3f} s; the rest (UNet, sampler) "
                  f"{b['step_s'] - b['get_control_s']:.3f} s")
    ratios, targets = {}, {}
    for name, (case, key, over, over_key, target) in RATIOS.items():
        ok = case in results and over in results and results[case].get(key) is not None and results[over].get(over_key)
        ratios[name] = results[case][key] / results[over][over_key] if ok else None
        targets[name] = target
        shown = "n/a" if ratios[name] is None else f"{ratios[name]:.3f}"
        print(f"{name:<46} {shown:>6}   {'' if target is None else f'target <= {target}'}")
    queue = None
    if args.queue:
        env = dict(os.environ, CTRLORA_RESIDUAL_CACHE_MB=str(args.queue_budget_mb))
        queue = subprocess_json(["--queue-only"], args, env)
        print(f"queue of {queue['prompts']} prompts: resident growth after the first {queue['growth_after_first_bytes'] / 2**20:.0f} MiB, "
              f"in the second half {queue['growth_second_half_bytes'] / 2**20:.0f} MiB; cache at most "
              f"{queue['max_cache_bytes'] / 2**20:.0f} MiB of its {queue['budget_bytes'] / 2**20:.0f} MiB budget")
    load_after = os.getloadavg()
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} cores)")
    gpu = args.device == "gpu"
    first = next(iter(results.values()))
    report = {"bench": "comfy_step", "device": device_label(gpu), "torch": first["torch"], "threads": first["threads"],
              "res": args.res, "cfg_batch": 2, "steps_timed": args.steps - 1, "repeats": args.repeats,
              "rounds": args.rounds, "sampler": "ddim / ddim_uniform, cfg 7.5", "lora_rank": 128,
              "load_average_before_after": [load_before, load_after], "results": results, "ratios": ratios,
              "targets": targets, "queue": queue,
              "memory_note": ("measured from after the checkpoint is loaded: peak = VmHWM (CPU) or CUDA max "
                              "allocated (GPU) minus the start; resident = VmRSS (after malloc_trim gave glibc's "
                              "freed heap back; before it: resident_untrimmed_bytes) / CUDA allocated after a "
                              "2-step run minus the start (residual cache entries included: residual_cache_bytes); "
                              "control_* = the case's value minus txt2img's (peak includes reading the model files)")}
    write_report(args.out or results_path("comfy_step", gpu), report)


if __name__ == "__main__":
    main()
