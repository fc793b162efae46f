#!/usr/bin/env bash
# Every GPU bench in one go; each writes its JSON under bench/results/ (<bench>_<gpu name>.json),
# copied to $OUT as soon as it is written when $OUT is set (the device tool's result folder):
#   core_forward                      residuals per step, one base vs three copies (no ComfyUI)
#   comfy_step --device gpu           per-step time and memory in ComfyUI, 512 px (needs ComfyUI)
#   realtime --device gpu             one dental image end to end vs the 1 s goal (needs ComfyUI)
#   train_step --end-to-end           trainer samples/s, memory, the 1k-pair recipe (no ComfyUI)
#
# The GPU machine has PyTorch but no network, no ComfyUI and not all of ComfyUI's packages. Prepare
# once where there is a network, from the repository root, with COMFYUI_PATH set to a ComfyUI checkout
# (the one the tests use, v0.3.64):
#   bench/run_gpu.sh --prepare        # .gpu/ComfyUI (its source, no models) + .gpu/wheels
# then on the GPU machine, from the repository root, with .gpu/ travelling along:
#   bench/run_gpu.sh                  # all four, in the order above (about 10 min on one H200)
#   bench/run_gpu.sh comfy_step realtime      # some of them
#   bench/run_gpu.sh --dry-run        # checks every bench's arguments, runs nothing heavy (works on a CPU)
# With the device tool (10 min a call), e.g. two calls back to back:
#   run(command="bench/run_gpu.sh core_forward comfy_step realtime", carry=[".gpu"], timeout_s=600)
#   run(command="bench/run_gpu.sh train_step", carry=[".gpu"], timeout_s=600)
# Options by environment: PYTHON (default python3), COMFYUI_PATH (default .gpu/ComfyUI),
# BENCH_RES (comfy_step image size, default 512).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
GPU_DIR=$ROOT/.gpu
ALL=(core_forward comfy_step realtime train_step)
# What ComfyUI v0.3.64 imports for these benches beyond the GPU image's packages (KINDS.md's list),
# found with importlib.metadata.packages_distributions() after the benches' imports: torchsde and its
# trampoline, and av (PyAV, 35 MB with FFmpeg: over the device tool's 64 MiB with the repository), which
# ComfyUI only uses for video; --prepare writes an import-only stand-in for it instead (.gpu/stubs/av),
# used when the machine has no av.
WHEELS=(torchsde trampoline)

prepare() {
    : "${COMFYUI_PATH:?set COMFYUI_PATH to the ComfyUI checkout to copy}"
    rm -rf "$GPU_DIR/ComfyUI" "$GPU_DIR/wheels"
    mkdir -p "$GPU_DIR/ComfyUI" "$GPU_DIR/wheels"
    tar -C "$COMFYUI_PATH" --exclude=.git --exclude=./models --exclude=./input --exclude=./output \
        --exclude=./user --exclude=./custom_nodes --exclude=./tests --exclude=./tests-unit \
        --exclude=__pycache__ --exclude='./comfy/text_encoders/*_tokenizer' -cf - . | tar -C "$GPU_DIR/ComfyUI" -xf -
    mkdir -p "$GPU_DIR/ComfyUI/custom_nodes" "$GPU_DIR/ComfyUI/models"
    # av stand-in: importable, every attribute a placeholder class; using it (video) raises
    mkdir -p "$GPU_DIR/stubs/av/subtitles"
    for module in __init__ container subtitles/__init__ subtitles/stream; do
        printf '"""Import-only stand-in for PyAV (bench/run_gpu.sh): ComfyUI imports it; these benches use no video."""\n\n\ndef __getattr__(name):\n    if name.startswith("__"):\n        raise AttributeError(name)\n    return type(name, (), {})\n' > "$GPU_DIR/stubs/av/$module.py"
    done
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$GPU_DIR/wheels" "${WHEELS[@]}"
    du -sh "$GPU_DIR/ComfyUI" "$GPU_DIR/wheels"
    echo "now carry .gpu to the GPU machine and run bench/run_gpu.sh there"
}

DRY=0
STAGES=()
for arg in "$@"; do
    case $arg in
        --prepare) prepare; exit 0 ;;
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        core_forward|comfy_step|realtime|train_step) STAGES+=("$arg") ;;
        *) echo "run_gpu.sh: unknown argument '$arg' (expected --prepare, --dry-run or ${ALL[*]})" >&2; exit 2 ;;
    esac
done
[ ${#STAGES[@]} -gt 0 ] || STAGES=("${ALL[@]}")

export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}  # ctrlora_core, train, demo, testbed by name
export PYTHONUNBUFFERED=1
export COMFYUI_PATH=${COMFYUI_PATH:-$GPU_DIR/ComfyUI}
RES=${BENCH_RES:-512}

needs_comfy=0
for stage in "${STAGES[@]}"; do
    [[ $stage == comfy_step || $stage == realtime ]] && needs_comfy=1
done
if [ $DRY = 0 ]; then
    if [ -d "$GPU_DIR/wheels" ] && ls "$GPU_DIR"/wheels/*.whl >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$GPU_DIR"/wheels/*.whl
        export PYTHONPATH=$PYTHONPATH:/tmp/site  # only packages the image lacks: nothing of its own is shadowed
    fi
    "$PYTHON" -c "import av" 2>/dev/null || export PYTHONPATH=$PYTHONPATH:$GPU_DIR/stubs
    "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))"
    if [ $needs_comfy = 1 ]; then
        [ -f "$COMFYUI_PATH/comfy/model_management.py" ] || { echo "no ComfyUI at $COMFYUI_PATH (run --prepare)" >&2; exit 2; }
        "$PYTHON" -m testbed.fake_models  # random-weight full-size models, cached in ~/.cache/comfyui-ctrlora-tests
    fi
fi

copy_out() {  # $1: bench name
    [ -n "${OUT:-}" ] || return 0
    cp bench/results/"$1"_*.json "$OUT"/ 2>/dev/null || true
}

run_stage() {  # $1: stage
    echo "=== $1 ($(date +%T))"
    case $1 in
        core_forward)
            if [ $DRY = 1 ]; then
                "$PYTHON" bench/core_forward.py --help | grep -q -- "--device" && echo "core_forward: arguments ok"
            else
                "$PYTHON" bench/core_forward.py --device cuda
            fi ;;
        comfy_step)
            "$PYTHON" bench/comfy_step.py --device gpu --res "$RES" --steps 10 --repeats 3 --rounds 1 \
                --queue 50 --queue-res "$RES" --queue-budget-mb 256 $([ $DRY = 1 ] && echo --dry-run) ;;
        realtime)
            "$PYTHON" bench/realtime.py --device gpu --res 512 --steps 6 --repeats 5 \
                $([ $DRY = 1 ] && echo --dry-run) ;;
        train_step)
            if [ $DRY = 1 ]; then
                "$PYTHON" bench/train_step.py --help | grep -q -- "--end-to-end" && echo "train_step: arguments ok"
            else
                "$PYTHON" bench/train_step.py --device cuda --end-to-end
            fi ;;
    esac
    copy_out "$1"
}

for stage in "${STAGES[@]}"; do
    run_stage "$stage"
done
echo "=== done ($(date +%T)); results in bench/results/"
