"""Per-step time and peak memory of CtrLoRA residuals vs a plain (merged) ControlNet.

    python bench/core_forward.py [--config sd15|small] [--res 512] [--batch 2] [--reps 5] [--device cuda]

Cases, all on the same random-weight Base ControlNet (official SD1.5 layout by default):
  plain       the base with one LoRA merged into its weights: exactly a plain ControlNet step
  single      one adapter applied at forward time (no weight rewriting)
  multi3      three adapters batched through one pass (one base copy)
  chained3    three conditions the official/ACN way: three separate base copies, one pass each
Each case runs in its own subprocess so its peak memory (CUDA max allocated, or peak RSS on
CPU) is its own. Prints a table and ratios; writes bench/results/core_forward_<device>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time

from bench_device import device_label, results_path, write_report

CASES = ("plain", "single", "multi3", "chained3")


def run_case(case: str, args: argparse.Namespace) -> dict:
    """Time one case in this process; return seconds per step and peak memory in bytes."""
    import torch
    from ctrlora_core.adapters import merged_adapter, stack_adapters
    from ctrlora_core.config import ControlNetConfig
    from ctrlora_core.random_weights import SMALL_CONFIG, random_adapter, random_base

    torch.manual_seed(0)
    config = ControlNetConfig() if args.config == "sd15" else SMALL_CONFIG
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device(args.device)
    copies = 3 if case == "chained3" else 1
    models = [random_base(config, seed=0).to(device, dtype) for _ in range(copies)]
    adapters = [random_adapter(models[0], args.rank, seed) for seed in (1, 2, 3)]
    latent = args.res // 8
    b = args.batch
    hint = torch.randn(b, 4, latent, latent, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (b,), device=device)
    ctx = torch.randn(b, 77, config.context_dim, device=device, dtype=dtype)

    weights = (0.5, 0.3, 0.2)
    with torch.no_grad(), contextlib.ExitStack() as merged:
        if case == "plain":
            merged.enter_context(merged_adapter(models[0], adapters[0]))
            step = lambda: models[0](hint, t, ctx)  # noqa: E731
        elif case == "single":
            stack = stack_adapters(adapters[:1]).to(device, dtype)
            step = lambda: models[0](hint, t, ctx, adapters=stack)  # noqa: E731
        elif case == "multi3":
            stack = stack_adapters(adapters, weights).to(device, dtype)
            hints = torch.cat([hint] * 3)
            step = lambda: models[0](hints, t, ctx, adapters=stack)  # noqa: E731
        else:  # three base copies, each with its own LoRA merged, one pass each, residuals summed
            for model, adapter in zip(models, adapters):
                merged.enter_context(merged_adapter(model, adapter))

            def step():
                outs = [model(hint, t, ctx) for model in models]
                return [sum(w * r for w, r in zip(weights, per_block)) for per_block in zip(*outs)]

        step()  # warm-up
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.reps):
            step()
        sync(device)
        seconds = (time.perf_counter() - start) / args.reps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"case": case, "s_per_step": seconds, "peak_bytes": peak}


def sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["sd15", "small"], default="sd15", help="ControlNet size (default sd15)")
    parser.add_argument("--res", type=int, default=None, help="image resolution in px (default 512 GPU, 256 CPU)")
    parser.add_argument("--batch", type=int, default=2, help="batch per step, e.g. 2 = cond+uncond (default 2)")
    parser.add_argument("--rank", type=int, default=128, help="LoRA rank (default 128, official)")
    parser.add_argument("--reps", type=int, default=None, help="timed steps per case (default 20 GPU, 3 CPU)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                        help="compute dtype (default fp16 on GPU, fp32 on CPU)")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    parser.add_argument("--out", default=None, help="JSON result path (default bench/results/core_forward_<device>.json)")
    args = parser.parse_args()
    import torch
    gpu = torch.cuda.is_available() if args.device is None else args.device.startswith("cuda")
    args.device = args.device or ("cuda" if gpu else "cpu")
    args.res = args.res or (512 if gpu else 256)
    args.reps = args.reps or (20 if gpu else 3)
    args.dtype = args.dtype or ("fp16" if gpu else "fp32")
    if args.case:
        print(json.dumps(run_case(args.case, args)))
        return

    results = {}
    for case in CASES:
        cmd = [sys.executable, __file__, "--case", case, "--config", args.config, "--res", str(args.res),
               "--batch", str(args.batch), "--rank", str(args.rank), "--reps", str(args.reps),
               "--device", args.device, "--dtype", args.dtype]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[case] = json.loads(out.strip().splitlines()[-1])
        r = results[case]
        print(f"{case:<9} {r['s_per_step'] * 1000:9.1f} ms/step   peak {r['peak_bytes'] / 2**30:6.2f} GiB", flush=True)
    p, s, m, c = (results[k] for k in CASES)
    ratios = {
        "single_vs_plain_time": s["s_per_step"] / p["s_per_step"],
        "multi3_vs_chained3_time": m["s_per_step"] / c["s_per_step"],
        "multi3_vs_chained3_peak_memory": m["peak_bytes"] / c["peak_bytes"],
        "multi3_vs_3x_plain_time": m["s_per_step"] / (3 * p["s_per_step"]),
    }
    for name, value in ratios.items():
        print(f"{name:<32} {value:.3f}")
    report = {"bench": "core_forward", "device": device_label(gpu), "torch": torch.__version__,
              "config": args.config, "res": args.res, "batch": args.batch, "rank": args.rank, "dtype": args.dtype,
              "reps": args.reps, "results": results, "ratios": ratios,
              "memory_note": "peak = CUDA max allocated" if gpu else "peak = process peak RSS (includes Python/torch)"}
    write_report(args.out or results_path("core_forward", gpu), report)


if __name__ == "__main__":
    main()
