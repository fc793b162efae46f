"""End-to-end seconds for one dental image at 512² with the fast settings, split into condition encode, sampling, decode.

    COMFYUI_PATH=/path/to/ComfyUI <ComfyUI's python> bench/realtime.py [--device cpu|gpu] [--steps 6]

The user's goal: one controlled dental image in under a second on a GPU. Settings of the
`dental_fast` example workflow: UniPC (ComfyUI's `uni_pc`, scheduler `simple`), 6 steps
(6-8 in the workflow), CFG 3.5, 512 x 512, one CtrLoRA condition (the dental LoRA on a
lighting + segmentation blend at alpha 0.3, drawn by demo/synth_dental.py), the full SD VAE.
ComfyUI runs as a library (its checkpoint loader, CLIP Text Encode, KSampler and VAE Decode
node code), with full-size random-weight models from testbed/fake_models.py.

Cases, in one process, taking turns for --repeats rounds after one untimed warm-up each:
  txt2img         no control
  ctrlora1        the graph's first run: the condition is VAE-encoded, residuals computed
  ctrlora1_rerun  the same graph again with a new seed: condition latent and residuals come
                  from the residual cache (what re-queueing costs)
Phases, in seconds: prompt (CLIP text encode of both prompts; ComfyUI keeps it across
re-runs, so it is reported but not in `total`), condition (the VAE encode of the condition
image, which runs inside the first sampling step, timed around `VAE.encode`), sampling
(KSampler minus condition), decode (VAE Decode); total = condition + sampling + decode.
On the CPU the figures that matter are the ratios to txt2img (at 256² by default: at 512²
ComfyUI's CPU attention took over 12 GiB in the UNet's first step, more than a shared 24 GiB
machine has free); on a GPU the absolute total against the 1 s goal. Writes
bench/results/realtime_<device>.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from bench_device import (CpuShare, child_result, device_label, ensure_fake_models, print_result, results_path,
                          write_report)
from testbed import fake_models
from testbed.comfy_host import import_comfy, load_pack, pack_module

PROMPT = "a photo of upper teeth, front view, dental photography, studio light"
NEGATIVE = "blurry, low quality, deformed, cartoon, drawing"
SAMPLER, SCHEDULER, CFG, BLEND_ALPHA = "uni_pc", "simple", 3.5, 0.3
CASES = ("txt2img", "ctrlora1", "ctrlora1_rerun")
GOAL_S = 1.0


def dental_condition(size: int):
    """A synthetic dental condition (lighting + segmentation blend) as a ComfyUI IMAGE [1, size, size, 3]."""
    import torch

    from demo.synth_dental import condition_image, make_scene, render

    maps = render(make_scene(seed=0, index=0), size=size, supersample=1)
    return torch.from_numpy(condition_image(maps, alpha=BLEND_ALPHA)).unsqueeze(0).float()


class Clock:
    """Wall seconds, waiting for the GPU first when there is one."""

    def __init__(self, gpu: bool):
        import torch

        self.sync = torch.cuda.synchronize if gpu else (lambda: None)

    def __call__(self) -> float:
        self.sync()
        return time.perf_counter()


class Graph:
    """The dental_fast graph with its nodes' code, models loaded once."""

    def __init__(self, args: argparse.Namespace):
        import_comfy(args.comfyui, cpu=args.device == "cpu")
        import folder_paths
        import nodes  # ComfyUI's own

        pack = load_pack()
        self.nodes, self.pack_nodes = nodes, pack.NODE_CLASS_MAPPINGS
        self.residual_cache = pack_module("nodes.residual_cache").SHARED
        self.clock = Clock(args.device == "gpu")
        self.args = args
        folder_paths.add_model_folder_path("checkpoints", fake_models.cache_dir())
        folder_paths.add_model_folder_path("ctrlora", fake_models.cache_dir())
        self.model, self.clip, self.vae = nodes.CheckpointLoaderSimple().load_checkpoint(fake_models.CHECKPOINT)[:3]
        self.latent = nodes.EmptyLatentImage().generate(args.res, args.res, 1)[0]
        self.condition = dental_condition(args.res)
        self.base = self.pack_nodes["CtrLoRABaseLoader"]().load(fake_models.BASE)["result"][0]
        self.lora = self.pack_nodes["CtrLoRALoRALoader"]().load(fake_models.DENTAL_LORA, 1.0)["result"][0]
        self.encode_seconds = 0.0
        encode = self.vae.encode

        def timed_encode(*a, **k):
            start = self.clock()
            try:
                return encode(*a, **k)
            finally:
                self.encode_seconds += self.clock() - start

        self.vae.encode = timed_encode  # the control calls the VAE it was given: this instance

    def prompts(self, control: bool) -> tuple[list, list, float]:
        start = self.clock()
        positive = self.nodes.CLIPTextEncode().encode(self.clip, PROMPT)[0]
        negative = self.nodes.CLIPTextEncode().encode(self.clip, NEGATIVE)[0]
        seconds = self.clock() - start
        if control:
            conditions = self.pack_nodes["CtrLoRACondition"]().add(self.lora, self.condition, 1.0)[0]
            positive, negative = self.pack_nodes["CtrLoRAApply"]().apply(positive, negative, self.base, conditions,
                                                                         self.vae, 1.0, 0.0, 1.0)
        return positive, negative, seconds

    def run(self, positive: list, negative: list, seed: int) -> dict:
        """One image: sampling (with the condition's encode inside it) and decode, in seconds."""
        self.encode_seconds = 0.0
        start = self.clock()
        samples = self.nodes.common_ksampler(self.model, seed, self.args.steps, CFG, SAMPLER, SCHEDULER, positive,
                                             negative, self.latent)[0]
        sampled = self.clock()
        self.nodes.VAEDecode().decode(self.vae, samples)
        decoded = self.clock()
        condition = self.encode_seconds
        return {"condition": condition, "sampling": sampled - start - condition, "decode": decoded - sampled,
                "total": decoded - start}


def measure(args: argparse.Namespace) -> dict:
    import torch

    graph = Graph(args)
    graphs = {"txt2img": graph.prompts(control=False), "ctrlora1": graph.prompts(control=True)}
    for case in ("txt2img", "ctrlora1"):  # warm-up: loads the models, first-call kernels
        graph.run(*graphs[case][:2], seed=0)
    runs: dict[str, list[dict]] = {case: [] for case in CASES}
    share = CpuShare()
    for repeat in range(args.repeats):
        with share:
            runs["txt2img"].append(graph.run(*graphs["txt2img"][:2], seed=repeat + 1))
            graph.residual_cache.clear()
            runs["ctrlora1"].append(graph.run(*graphs["ctrlora1"][:2], seed=repeat + 1))
            runs["ctrlora1_rerun"].append(graph.run(*graphs["ctrlora1"][:2], seed=repeat + 101))
    results = {}
    for case, case_runs in runs.items():
        best = min(case_runs, key=lambda r: r["total"])
        prompt = graphs["txt2img" if case == "txt2img" else "ctrlora1"][2]
        results[case] = {**best, "prompt": prompt, "runs": case_runs}
    return {"results": results, "cpu_share": share.value(torch.get_num_threads()), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout ($COMFYUI_PATH)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--res", type=int, default=None,
                        help="image size in px (default 512 on a GPU, 256 on the CPU: there ComfyUI's default "
                             "sub-quadratic attention needs over 12 GiB at 512)")
    parser.add_argument("--steps", type=int, default=6, help="UniPC steps (default 6; dental_fast uses 6-8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 1 on the CPU, 5 on a GPU)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # internal: the measuring process
    parser.add_argument("--dry-run", action="store_true", help="check the arguments and print the plan; run nothing")
    args = parser.parse_args()
    args.repeats = args.repeats or (5 if args.device == "gpu" else 1)
    args.res = args.res or (512 if args.device == "gpu" else 256)
    if args.dry_run:
        print(f"realtime: {args.device}, {args.res}px, {SAMPLER}/{SCHEDULER} {args.steps} steps CFG {CFG}, "
              f"cases {' '.join(CASES)}, {args.repeats} rounds; ComfyUI at {args.comfyui}")
        return
    if not args.comfyui:
        sys.exit("set COMFYUI_PATH (or --comfyui) to a ComfyUI checkout")
    if args.measure:
        print_result(measure(args))
        return

    ensure_fake_models(args.comfyui)
    load_before = os.getloadavg()
    command = [sys.executable, __file__, "--measure", "--comfyui", args.comfyui, "--device", args.device,
               "--res", str(args.res), "--steps", str(args.steps), "--repeats", str(args.repeats)]
    measured = child_result(command, "realtime")
    results = measured["results"]
    gpu = args.device == "gpu"
    print(f"{'case':<15} {'prompt':>7} {'condition':>9} {'sampling':>9} {'decode':>7} {'total':>7}  (seconds)")
    for case, r in results.items():
        print(f"{case:<15} {r['prompt']:7.3f} {r['condition']:9.3f} {r['sampling']:9.3f} {r['decode']:7.3f} "
              f"{r['total']:7.3f}")
    base = results["txt2img"]
    ratios = {f"{case}_over_txt2img_{phase}": results[case][phase] / base[phase]
              for case in ("ctrlora1", "ctrlora1_rerun") for phase in ("sampling", "total")}
    for name, value in ratios.items():
        print(f"{name:<36} {value:.3f}")
    if gpu:
        for case in ("ctrlora1", "ctrlora1_rerun"):
            total = results[case]["total"]
            print(f"{case}: {total:.3f} s end to end, goal < {GOAL_S} s: {'met' if total < GOAL_S else 'NOT met'}")
    load_after = os.getloadavg()
    print(f"CPU share {measured['cpu_share']:.2f}; load average before {load_before[0]:.2f}, after "
          f"{load_after[0]:.2f} ({os.cpu_count()} cores)")
    report = {"bench": "realtime", "device": device_label(gpu), "torch": measured["torch"],
              "threads": measured["threads"], "res": args.res, "steps": args.steps, "sampler": SAMPLER,
              "scheduler": SCHEDULER, "cfg": CFG, "repeats": args.repeats, "goal_s": GOAL_S,
              "cpu_share": measured["cpu_share"], "load_average_before_after": [load_before, load_after],
              "results": results, "ratios": ratios,
              "note": ("random-weight full-size SD1.5 + CtrLoRA base + rank-128 LoRA; total = condition + "
                       "sampling + decode (the prompt encode is cached by ComfyUI across re-runs)")}
    write_report(results_path("realtime", gpu), report)


if __name__ == "__main__":
    main()
