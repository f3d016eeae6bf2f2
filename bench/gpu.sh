#!/usr/bin/env bash
# Every GPU measurement this project owes, in one command, on a machine with one or more NVIDIA GPUs and a clone:
#
#   bash bench/gpu.sh                 # ~12 min on one H100/H200; writes gpu_results.md (paste into BENCHMARKS.md)
#   bash bench/gpu.sh --dry-run       # no GPU: checks that every step resolves, runs the scripts' CPU dry runs, skips
#
# Steps (each under its own time limit, so one that hangs or overruns cannot eat the others' time):
#   1. the GPU kernel tests (test_kernels.py: bf16/fp16/fp32 vs PyTorch, determinism, torch.compile, a 50-step
#      training comparison kernels on/off)
#   2. the kernel benchmarks vs PyTorch eager, torch.compile, F.rms_norm, SDPA flash / cuDNN / math (bench/kernels.py),
#      with attention within packed documents against the plain causal kernel and flash-attn's varlen function
#   2b. packed documents: a packed SFT step and one layer's attention with the old (B, T, T) mask, documents.py's
#      PyTorch path and the Triton kernel's document variant: peak memory and time (bench/packed.py)
#   3. train-step throughput, MFU and peak memory of the 135M, 360M and 1.7B presets at T=2048, bf16 autocast, eager
#      and compiled, kernels off and on (bench/train.py)
#   3b. train.py under torch.compile on CUDA equals eager (test_scale.py); plan.py's memory plan vs the measured peak
#   4. with >= 2 GPUs: DDP and FSDP2 over NCCL on all of them vs one GPU (bench/train.py under torchrun)
# Environment: OUT=path for the results file (default gpu_results.md), PYTHON (default python). Packages are installed
# from requirements*.txt only if one is missing.
# shellcheck disable=SC2015  # `check && note ok || note FAILED`: the note of a failure is wanted whichever part failed
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
[ $# -gt 0 ] && [ "$1" != "--dry-run" ] && { echo "usage: bash bench/gpu.sh [--dry-run]" >&2; exit 2; }
PY=${PYTHON:-python}
OUT=${OUT:-gpu_results.md}
NGPU=0
if [ $DRY = 0 ]; then
    NGPU=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
    if [ "$NGPU" = 0 ]; then
        echo "bench/gpu.sh: no CUDA GPU visible to $PY (torch.cuda.device_count() == 0); use --dry-run to check the" \
             "script on a CPU machine" >&2
        exit 1
    fi
fi
FAILED=0

note() { echo "$*" | tee -a "$OUT"; }

# step NAME LIMIT_S COMMAND...: runs it (output to the console and, for the tables, to $OUT), or in a dry run checks
# that the script it names exists and compiles, and records the skip with its reason
step() {
    local name=$1 limit=$2; shift 2
    note ""
    note "### $name"
    note ""
    note "command: \`$*\`"
    note ""
    if [ $DRY = 1 ]; then
        local script
        for script in "$@"; do
            case $script in *.py) [ -f "$script" ] && "$PY" -m py_compile "$script" \
                || { note "FAILED: $script is missing or does not compile"; FAILED=1; return; } ;; esac
        done
        note "skipped: dry run (no GPU); the command resolves (${limit} s limit on a GPU)"
        return
    fi
    local t0=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT.log" | grep -E '^\|' >> "$OUT"
    rc=${PIPESTATUS[0]}
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        note "TIMED OUT after ${limit} s (rows above are the ones that finished)"; FAILED=1
    elif [ "$rc" != 0 ]; then
        note "FAILED with exit status $rc (see $OUT.log)"; FAILED=1
    else
        note "done in $((SECONDS - t0)) s"
    fi
}

: > "$OUT"; : > "$OUT.log"
note "## GPU runs ($(date -u +%Y-%m-%d) UTC, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
note ""
if [ $DRY = 1 ]; then
    note "DRY RUN on $(uname -m) without a GPU: every step below is checked to resolve, then skipped."
else
    note "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sort | uniq -c)"
    note "$($PY -c 'import torch, triton; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}")')"
fi

# 0. packages: installed only when something the tests and benchmarks import is missing (a GPU machine may be offline)
if ! $PY -c "import torch, triton, numpy, tokenizers, pytest" 2>/dev/null; then
    $PY -m pip install -q -r requirements.txt -r requirements-test.txt \
        || { note "FAILED: pip install -r requirements.txt -r requirements-test.txt"; exit 1; }
fi

step "Kernel tests on the GPU" 150 "$PY" -m pytest -q -rs test_kernels.py
if [ $DRY = 1 ]; then
    "$PY" -m pytest -q --collect-only test_kernels.py > /dev/null 2>&1 && note "test_kernels.py: collected" \
        || { note "FAILED: pytest cannot collect test_kernels.py"; FAILED=1; }
fi
# the pytest summary is not a table: keep its last line
[ $DRY = 0 ] && note "$(grep -E 'passed|failed|error' "$OUT.log" | tail -1)"

step "Kernels vs PyTorch (bf16)" 240 "$PY" bench/kernels.py --e2e_compile=0
if [ $DRY = 1 ]; then  # the benchmark's own CPU dry run: every code path once, tiny shapes, interpreter
    TRITON_INTERPRET=1 timeout 300 "$PY" bench/kernels.py --dry_run=1 --only=rmsnorm > /dev/null 2>&1 \
        && note "bench/kernels.py --dry_run=1 --only=rmsnorm: ran on CPU" \
        || { note "FAILED: bench/kernels.py --dry_run=1 --only=rmsnorm"; FAILED=1; }
fi

step "Packed documents: (B, T, T) mask vs Documents (PyTorch path, Triton kernel), fp32" 180 "$PY" bench/packed.py
if [ $DRY = 1 ]; then  # its CPU path at a tiny size: both variants, each in its own process
    timeout 300 "$PY" bench/packed.py --part=attention --block_sizes=64 --micro_batch_size=1 > "$OUT.packed" 2>&1 \
        && grep -q '^| attention | 64 | ratio mask' "$OUT.packed" \
        && note "bench/packed.py --part=attention --block_sizes=64: ran on CPU" \
        || { note "FAILED: bench/packed.py on CPU (see $OUT.packed)"; FAILED=1; }
    rm -f "$OUT.packed"
fi

step "Training step: presets x {eager, compile} x {kernels off, on}, T=2048" 240 \
    "$PY" bench/train.py --steps=8 --warmup=3

# train.py itself under torch.compile on CUDA: test_scale.py's comparison with eager (the quickstart model, fp32, a stage
# that changes the shape mid-run, so the compiled model must recompile); then the memory plan against the real peak
step "train.py --compile=True vs eager on the GPU (test_scale.py)" 300 \
    "$PY" -m pytest -q -rs test_scale.py -k compiled_quickstart
[ $DRY = 0 ] && note "$(grep -E 'passed|failed|error' "$OUT.log" | tail -1)"
step "Memory plan vs measured peak: 135M, 8 x 2048, bf16, 1 GPU (plan.py --measure)" 300 \
    "$PY" plan.py configs/smol135m.py --gpus=1 --measure --micro_batch_size=8 --total_batch_tokens=65536
if [ $DRY = 1 ]; then  # the same check on this CPU, at the quickstart's size
    timeout 300 "$PY" plan.py configs/quickstart.py --device=cpu --measure > "$OUT.plan" 2>&1 \
        && grep -q '^| plan vs measured' "$OUT.plan" \
        && note "plan.py configs/quickstart.py --device=cpu --measure: ran on CPU" \
        || { note "FAILED: plan.py --measure on CPU (see $OUT.plan)"; FAILED=1; }
    rm -f "$OUT.plan"
fi

if [ $DRY = 1 ]; then  # the multi-process path on gloo with the tiny preset: wrapping, sharding and the table
    for par in ddp fsdp; do
        timeout 300 "$PY" -m torch.distributed.run --nproc_per_node=2 bench/train.py --device=cpu --parallel=$par \
            --presets="['tiny']" --variants="['eager']" --block_size=64 --steps=1 --warmup=1 > "$OUT.$par" 2>&1 \
            && grep -q '^| tiny | 2 | '$par' ' "$OUT.$par" \
            && note "bench/train.py --parallel=$par: 2 CPU processes (gloo) ran" \
            || { note "FAILED: bench/train.py --parallel=$par on 2 CPU processes (see $OUT.$par)"; FAILED=1; }
        rm -f "$OUT.$par"
    done
fi
if [ "$NGPU" -ge 2 ] || [ $DRY = 1 ]; then
    NP=$NGPU; [ $DRY = 1 ] && NP="<GPUs>"
    for par in ddp fsdp; do
        step "$par on $NP GPUs (NCCL), eager, kernels off" 90 "$PY" -m torch.distributed.run \
            --nproc_per_node="$NP" bench/train.py --parallel=$par --presets="['smol360m','smol1.7b']" \
            --variants="['eager']" --steps=8 --warmup=3
    done
else
    note ""
    note "### DDP / FSDP2 over NCCL"
    note ""
    note "skipped: one GPU on this machine (needs >= 2)"
fi

note ""
[ $FAILED = 0 ] && note "all steps completed" || note "SOME STEPS FAILED (above)"
echo >&2
echo "results: $OUT (full output: $OUT.log)" >&2
exit $FAILED
