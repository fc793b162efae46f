"""The trainer end to end on the miniature models: output file, resume, atomic saves, DDP, options."""
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from ctrlora_core.adapters import CtrLoRAAdapter, stack_adapters
from ctrlora_core.api import control_residuals
from ctrlora_core.errors import CtrLoRAError
from ctrlora_core.files import file_sha256
from ctrlora_core.formats import CONTROL_PREFIX, FileKind, load_adapter, load_base, read_tensors, scan_file
from ctrlora_core.prompts import DEFAULT_TEMPLATE
from ctrlora_core.random_weights import write_random_files
from ctrlora_core.schedule import NoiseSchedule
from float_reference import EPS32, FACTOR, assert_float32_apart, assert_float32_close
from train_data import one_thread, write_dental  # noqa: F401
from train import train_lora
from train.backbones import open_backbone
from train.backbones.tiny import TinyBackbone

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dental(tmp_path_factory.mktemp("train") / "teeth", count=8)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "weights"
    TinyBackbone.random(0).save(folder)
    return folder


def train(data, out, *extra, model="tiny-random"):
    args = ["--data", str(data), "--model", str(model), "--out", str(out), "--rank", "4", "--lr", "3e-3",
            "--val-every", "0", "--log-every", "1", "--steps", "4", "--batch-size", "2", *map(str, extra)]
    return train_lora.main(args)


def lora_tensors(path):
    return read_tensors(path), scan_file(path).metadata


# The LoRAs of the miniature base whose gradient is zero in exact arithmetic at 64 px (8 x 8 latents):
# - self-attention q/k at the middle block, whose 1 x 1 feature map is one token: softmax over
#   a single key is 1 whatever q and k are;
# - the time-embedding projection of the two ResBlocks at the first level: it adds one constant per
#   channel, and the GroupNorm after it (32 groups of 32 channels: one channel per group) subtracts it.
# In float32 their gradients are rounding noise, zero or not depending on the CPU's kernels, and Adam
# scales noise up to full steps: after training they hold no predictable value.
NO_GRADIENT = sorted([f"middle_block.1.transformer_blocks.0.attn1.to_{x}.lora_layer.up.weight" for x in "qk"]
                     + [f"input_blocks.{i}.0.emb_layers.1.lora_layer.up.weight" for i in (1, 2)])


def test_only_the_lora_layers_without_effect_get_no_gradient():
    """Gradients of a fresh adapter (up = 0, as training starts) in float32 and float64: the float64
    gradient of NO_GRADIENT is float64 round-off, every other one is real; float32's is round-off too."""
    base = TinyBackbone.random(0).controlnet
    fresh = CtrLoRAAdapter.fresh(base, 4, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    hint, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 8, 64, generator=g)
    t = torch.tensor([500, 40])
    grads = {}
    for dtype in (torch.float32, torch.float64):
        model = copy.deepcopy(base).to(dtype)
        params = {k: v.to(dtype, copy=True).requires_grad_() for k, v in fresh.tensors.items()}
        residuals = model(hint.to(dtype), t, context.to(dtype), adapters=stack_adapters([CtrLoRAAdapter(params)]))
        weights = torch.Generator().manual_seed(2)  # a loss that depends on every residual value
        sum((r * torch.randn(r.shape, generator=weights, dtype=dtype)).sum() for r in residuals).backward()
        grads[dtype] = {k: torch.zeros_like(p) if p.grad is None else p.grad  # None: the loss never reached it
                        for k, p in params.items() if k.endswith("up.weight")}
    g32, g64 = grads[torch.float32], grads[torch.float64]
    # float32's rounding error on this gradient; float64 rounds the same computation EPS32/EPS64 = 2**29 finer
    rounding32 = max(float((g32[k].double() - g64[k]).abs().max()) for k in g64)
    rounding64 = rounding32 * torch.finfo(torch.float64).eps / EPS32
    assert sorted(k for k in g64 if g64[k].abs().max() <= FACTOR * rounding64) == NO_GRADIENT
    assert all(g32[k].abs().max() <= FACTOR * rounding32 for k in NO_GRADIENT)


def test_trained_lora_has_official_layout_metadata_and_changes_residuals(data, weights, tmp_path):
    summary = train(data, tmp_path / "run", model=weights)
    tensors, metadata = lora_tensors(summary["lora"])
    summary_ = scan_file(summary["lora"])
    kind, control = summary_.kind, summary_.shapes
    assert kind == FileKind.CTRLORA_LORA and all(k.startswith(CONTROL_PREFIX) for k in tensors)
    base_path = weights / "base.safetensors"
    base = load_base(base_path)
    fresh = CtrLoRAAdapter.fresh(base, 4)
    assert set(control) == set(fresh.tensors)
    assert metadata["rank"] == "4" and metadata["condition"] == "teeth"
    assert metadata["training_steps"] == "4" and metadata["resolution"] == "64x64"
    assert metadata["prompt_template"] == DEFAULT_TEMPLATE
    assert metadata["base_sha256"] == file_sha256(base_path)

    adapter = load_adapter(summary["lora"], base)  # checked against the base key for key
    # every LoRA with a gradient moved from its zero start (`up` starts at 0 and stays exactly 0 without one)
    ups = {k: t for k, t in adapter.tensors.items() if k.endswith("up.weight")}
    assert set(NO_GRADIENT) < set(ups) and all(ups[k].abs().max() > 0 for k in ups if k not in NO_GRADIENT)

    hint = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t, context = torch.tensor([500]), torch.randn(1, 32, 64, generator=torch.Generator().manual_seed(2))
    plain = control_residuals(str(base_path), [], None, 1.0, [hint], t, context)
    plain64 = control_residuals(str(base_path), [], None, 1.0, [hint], t, context, dtype=torch.float64)
    with torch.no_grad():
        untrained = base(hint, t, context, adapters=stack_adapters([fresh]))
    trained = control_residuals(str(base_path), [summary["lora"]], [1.0], 1.0, [hint], t, context)
    assert len(trained) == 13
    assert_float32_close(untrained, plain, plain64)  # a fresh adapter is the base
    assert_float32_apart(trained, plain, plain64)  # the trained one changes every residual


def test_resume_is_bit_identical_to_an_uninterrupted_run(data, tmp_path):
    straight = train(data, tmp_path / "straight", "--steps", 6, "--save-every", 3)
    train(data, tmp_path / "split", "--steps", 3)
    resumed = train(data, tmp_path / "split", "--steps", 6, "--resume")
    a, meta_a = lora_tensors(straight["lora"])
    b, meta_b = lora_tensors(resumed["lora"])
    assert meta_b["training_steps"] == "6"
    assert all(torch.equal(a[k], b[k]) for k in a)
    state_a = torch.load(straight["state"], weights_only=True)
    state_b = torch.load(resumed["state"], weights_only=True)
    for sa, sb in zip(state_a["optimizer"]["state"].values(), state_b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    # a run that differed (other seed) must not match: the comparison above can fail
    other = train(data, tmp_path / "other", "--steps", 6, "--seed", 1)
    c, _ = lora_tensors(other["lora"])
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_refuses_changed_options(data, tmp_path):
    train(data, tmp_path / "run", "--steps", 2)
    with pytest.raises(CtrLoRAError, match="rank"):
        train(data, tmp_path / "run", "--steps", 4, "--resume", "--rank", 8)


def test_learning_rate_schedules():
    def curve(*flags):
        config = train_lora.parse_config(["--data", "d", "--model", "m", "--lr", "1e-3", "--steps", "10", *flags])
        return [train_lora.learning_rate(config, step) for step in range(10)]

    assert curve() == [1e-3] * 10
    warm = curve("--lr-warmup", "4")
    assert warm[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3]) and warm[4:] == [1e-3] * 6
    cosine = curve("--lr-schedule", "cosine", "--lr-warmup", "2")
    assert cosine[:3] == pytest.approx([5e-4, 1e-3, 1e-3])
    assert all(a > b for a, b in zip(cosine[2:], cosine[3:]))  # decays every step after the warm-up ...
    assert cosine[6] == pytest.approx(5e-4) and 0 < cosine[-1] < 1e-4  # ... through half-way to almost 0
    for bad in (["--lr-schedule", "linear"], ["--lr-warmup", "10"]):
        with pytest.raises(SystemExit):
            curve(*bad)


def test_cosine_run_logs_its_curve_and_resumes_on_it(data, tmp_path, monkeypatch):
    flags = ("--steps", 6, "--lr-schedule", "cosine", "--lr-warmup", 2, "--save-every", 3)
    straight = train(data, tmp_path / "straight", *flags)
    config = train_lora.parse_config(["--data", "d", "--model", "m", "--lr", "3e-3", *map(str, flags)])
    logged = [json.loads(line)["lr"] for line in open(tmp_path / "straight" / "log.jsonl")]
    assert logged == [train_lora.learning_rate(config, step) for step in range(6)]
    assert scan_file(straight["lora"]).metadata["lr_schedule"] == "cosine"

    calls = []
    real_loss_on = train_lora.loss_on

    def interrupted(*args):  # the run stops in step 4, after the state of step 3 was saved
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_loss_on(*args)

    monkeypatch.setattr(train_lora, "loss_on", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(data, tmp_path / "split", *flags)
    monkeypatch.setattr(train_lora, "loss_on", real_loss_on)
    with pytest.raises(CtrLoRAError, match="steps"):  # a longer run would jump to another curve
        train(data, tmp_path / "split", *flags[2:], "--steps", 8, "--resume")
    resumed = train(data, tmp_path / "split", *flags, "--resume")
    a, _ = lora_tensors(straight["lora"])
    b, _ = lora_tensors(resumed["lora"])
    assert all(torch.equal(a[k], b[k]) for k in a)


# Equivalence runs: two runs that differ only in summation order (across micro-batches or processes).
# - Adam with a large epsilon behaves like SGD with momentum, so rounding differences stay as small
#   as they are, instead of being scaled up by Adam's per-element normalisation of gradients that are
#   zero but for rounding (see NO_GRADIENT).
# - The images are 128 px (16 x 16 latents): at 64 px the middle block is 1 x 1, its GroupNorms
#   normalise two values per group, and a step that brings the two close turns rounding into large
#   gradient differences (up to 20% of the update after 4 steps, depending on the seed).
# "Equal" = every tensor within ROUNDING of the largest training update: float32 rounding through the
# ~30 layers of forward and backward, summed over 4 steps, in 2**10 float32 steps (measured: <= 40).
LINEAR_ADAM = ("--lr", 1.0, "--adam-eps", 1.0)
ROUNDING = 2**10 * EPS32


@pytest.fixture(scope="module")
def data128(tmp_path_factory):
    return write_dental(tmp_path_factory.mktemp("train128") / "teeth", count=8, size=128)


def assert_same_training(path_a, path_b, seed=0, rank=4):
    a, _ = lora_tensors(path_a)
    b, _ = lora_tensors(path_b)
    initial = CtrLoRAAdapter.fresh(TinyBackbone.random(0).controlnet, rank, torch.Generator().manual_seed(seed))
    update = max(float((a[k] - initial.tensors[k[len(CONTROL_PREFIX):]]).abs().max()) for k in a)
    difference = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert update > 1e-3 and difference <= ROUNDING * update, (difference, update)


def test_gradient_accumulation_matches_a_larger_batch(data128, tmp_path):
    big = train(data128, tmp_path / "big", "--steps", 4, "--batch-size", 2, *LINEAR_ADAM)
    accum = train(data128, tmp_path / "accum", "--steps", 4, "--batch-size", 1, "--grad-accum", 2, *LINEAR_ADAM)
    assert_same_training(big["lora"], accum["lora"])
    one = train(data128, tmp_path / "one", "--steps", 4, "--batch-size", 1, *LINEAR_ADAM)
    with pytest.raises(AssertionError):  # a different global batch really gives another result
        assert_same_training(big["lora"], one["lora"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(data128, tmp_path):
    single = train(data128, tmp_path / "single", "--steps", 4, "--batch-size", 2, *LINEAR_ADAM)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(ROOT / "train" / "train_lora.py"),
               "--data", str(data128), "--model", "tiny-random", "--out", str(tmp_path / "ddp"), "--rank", "4",
               "--val-every", "0", "--log-every", "1", "--steps", "4", "--batch-size", "1", "--device", "cpu",
               *map(str, LINEAR_ADAM)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "global batch 2 = batch size 1 x grad accum 1 x 2 process(es)" in done.stdout + done.stderr
    assert lora_tensors(tmp_path / "ddp" / "lora.safetensors")[1]["global_batch"] == "2"
    assert_same_training(single["lora"], tmp_path / "ddp" / "lora.safetensors")
    losses_single = [r["loss"] for r in map(json.loads, open(tmp_path / "single" / "log.jsonl")) if "loss" in r]
    losses_ddp = [r["loss"] for r in map(json.loads, open(tmp_path / "ddp" / "log.jsonl")) if "loss" in r]
    assert len(losses_ddp) == 4 and losses_ddp == pytest.approx(losses_single, rel=ROUNDING, abs=0)


def test_a_failing_save_leaves_the_last_good_files(data, tmp_path, monkeypatch):
    summary = train(data, tmp_path / "run", "--steps", 2)
    before, _ = lora_tensors(summary["lora"])
    state_before = Path(summary["state"]).read_bytes()

    import safetensors.torch

    def broken_save(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    monkeypatch.setattr("ctrlora_core.formats.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train(data, tmp_path / "run", "--steps", 4, "--resume")
    after, _ = lora_tensors(summary["lora"])
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".tmp")) == []
    # the state file was replaced atomically with the step-4 state before the LoRA write failed
    state = torch.load(summary["state"], weights_only=True)
    assert state["step"] == 4 and Path(summary["state"]).read_bytes() != state_before


def test_killing_the_trainer_never_corrupts_the_last_good_file(data, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train" / "train_lora.py"), "--data", str(data), "--model", "tiny-random",
               "--out", str(out), "--rank", "4", "--val-every", "0", "--steps", "100000", "--save-every", "1",
               "--batch-size", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    lora = out / "lora.safetensors"
    for kill_after in (0.05, 0.3, 0.17):
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not lora.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(kill_after)
        process.send_signal(signal.SIGKILL)
        process.wait()
        adapter = load_adapter(lora)
        state = torch.load(out / "train_state.pt", weights_only=True)
        assert int(adapter.metadata["training_steps"]) >= 1 and state["step"] >= 1
        command += ["--resume"] if "--resume" not in command else []
    resumed = train(data, out, "--steps", state["step"] + 1, "--resume", "--batch-size", 1)
    assert scan_file(resumed["lora"]).metadata["training_steps"] == str(state["step"] + 1)


def test_validation_writes_a_grid_and_logs_psnr_ssim(data, tmp_path):
    out = tmp_path / "run"
    train(data, out, "--steps", 2, "--val-every", 2, "--val-count", 2, "--val-steps", 2)
    grids = sorted(p.name for p in (out / "val").iterdir())
    assert grids == ["step_000000.png", "step_000002.png"]
    assert Image.open(out / "val" / "step_000002.png").size == (3 * 64, 2 * 64)
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    val = [r for r in records if "val_psnr" in r]
    assert [r["step"] for r in val] == [0, 2]
    assert all(0 < r["val_psnr"] < 100 and -1 <= r["val_ssim"] <= 1 for r in val)
    assert [r["step"] for r in records if "loss" in r] == [1, 2]


def test_config_file_then_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"data": "d", "model": "tiny-random", "steps": 7, "lr": "2e-4",
                                      "gradient-checkpointing": True}))
    parsed = train_lora.parse_config(["--config", str(config), "--steps", "3"])
    assert parsed.steps == 3 and parsed.lr == 2e-4 and parsed.gradient_checkpointing and parsed.rank == 128
    toml = tmp_path / "run.toml"
    toml.write_text('data = "d"\nmodel = "m"\nbatch_size = 4\n')
    assert train_lora.parse_config(["--config", str(toml)]).batch_size == 4
    config.write_text("data: d\nmodel: m\nlearning_rate: 1.0\n")
    with pytest.raises(ValueError, match="learning_rate"):
        train_lora.parse_config(["--config", str(config)])


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        train_lora.parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for field in train_lora.TrainConfig.__dataclass_fields__:
        assert "--" + field.replace("_", "-") in text


def test_missing_comfyui_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    checkpoint = str(tmp_path / "sd.safetensors")  # files that pass the header checks made before ComfyUI is looked for
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(1)}, checkpoint)
    base = write_random_files(tmp_path, lora_names=())["base"]
    with pytest.raises(CtrLoRAError, match="ComfyUI not found.*--comfyui"):
        open_backbone(checkpoint, base, "", torch.device("cpu"), torch.float32)
    with pytest.raises(CtrLoRAError, match="not a ComfyUI folder"):
        open_backbone(checkpoint, base, str(tmp_path), torch.device("cpu"), torch.float32)


def test_batches_are_drawn_per_sample_slot():
    moments = torch.randn(3, 8, 4, 4)
    table = torch.randn(3, 5, 6)
    schedule = NoiseSchedule()

    def batch(dropout, slots, rows):
        generators = [train_lora.slot_generator(0, 0, s) for s in slots]
        return train_lora.make_batch(moments[rows], moments[rows], [r % 3 for r in rows], table, generators, 0.5,
                                     schedule, dropout, torch.device("cpu"))

    a, b = batch(0.3, [0, 1], [0, 1]), batch(0.3, [0, 1], [0, 1])
    assert torch.equal(a.x_t, b.x_t) and torch.equal(a.hint, b.hint) and torch.equal(a.t, b.t)
    single = batch(0.3, [1], [1])  # slot 1 alone draws what it drew inside the batch
    assert torch.equal(single.x_t[0], a.x_t[1]) and torch.equal(single.hint[0], a.hint[1])
    other_slot = batch(0.3, [2], [1])
    assert not torch.equal(other_slot.x_t[0], a.x_t[1])
    assert torch.equal(batch(1.0, [0, 1], [1, 2]).context, table[[0, 0]])
    assert torch.equal(batch(0.0, [0, 1], [1, 2]).context, table[[1, 2]])


def test_official_layout_with_a_bad_pair_skipped_and_no_disk_cache(tmp_path):
    from train_data import write_official

    data = write_official(tmp_path / "official", count=5, as_array=True)
    (data / "target" / "3.png").write_bytes(b"broken")
    with pytest.raises(CtrLoRAError, match="3.png: unreadable image"):
        train(data, tmp_path / "strict", "--steps", 1)
    summary = train(data, tmp_path / "run", "--steps", 2, "--skip-bad", "--cache-dir", "none",
                    "--condition", "discs")
    assert len(summary["issues"]) == 1 and summary["issues"][0].startswith(f"{data / 'target' / '3.png'}: unreadable")
    assert not (tmp_path / "run" / "cache").exists()
    _, metadata = lora_tensors(summary["lora"])
    assert metadata["condition"] == "discs" and metadata["pairs"] == "4"
