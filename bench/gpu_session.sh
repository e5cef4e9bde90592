#!/usr/bin/env bash
# Everything only a GPU can show, as separate runs that each fit one call of the device tool. The first call
# answers the big questions, in this order, in about 6 minutes on a warm H100 with the machine's own torch
# and Triton (nothing downloaded):
#
#   bash bench/gpu_session.sh first     # pytest -m gpu; profile traces of a 2-layer Mixtral-shaped slice in
#                                       # bf16 and 4-bit (decode time vs transfer bound); pinned H2D bandwidth;
#                                       # (a) moe-offload vs accelerate on that slice; Triton GEMV GB/s
#   bash bench/gpu_session.sh checks    # later: the MoLE model on CUDA, the offload sweep, quantization, profile
#                                       # with --cpu-experts auto
#   bash bench/gpu_session.sh compare   # later: bench/compare's full sweep on a 4-layer slice at 6 GiB
#   bash bench/gpu_session.sh families  # later: the Qwen3-30B-A3B- and DeepSeek-V2-Lite-shaped slices, the family tests
#   bash bench/gpu_session.sh first --dry-run   # any machine: the steps, their commands and expected seconds
#
# Without a CUDA device a run prints its steps as --dry-run does and exits 0 (CI checks that, and that
# bench/gpu_first.py resolves everything its stages call). From the repository root, with the repository's
# own packages (no install needed). Records, logs and profiles land in $RESULTS (default
# bench/results/gpu-session, which git ignores): first-gpu.json holds every figure of the first call with the
# device, torch and Triton versions, written as each is measured; keep what matters by copying it into
# bench/results/. Through the device tool, which brings back only a few files of its $OUT, pack them into
# one: `RESULTS=$OUT/r PACK=$OUT/first.tgz bash bench/gpu_session.sh first`.
#
# Each step has a cap (twice its expected time) and every step runs under one deadline, DEADLINE seconds from
# the start (default 360 for `first`, 540 otherwise: a 10-minute call less the start and the packing), so a
# slow step cannot take the call's output with it: what is most wanted runs first, a step that reaches its
# cap or the deadline is stopped, later ones run in what is left or are skipped. With PACK=file.tgz, $RESULTS
# is packed into that file on exit.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-}
DRY=0
[ "${2:-}" = "--dry-run" ] && DRY=1
case "$what" in
first) DEADLINE=${DEADLINE:-360} ;;
checks | compare | families) DEADLINE=${DEADLINE:-540} ;;
*)
    echo "usage: [RESULTS=folder] [PACK=file.tgz] [DEADLINE=seconds] bash bench/gpu_session.sh first|checks|compare|families [--dry-run]" >&2
    exit 2
    ;;
esac
RESULTS=${RESULTS:-bench/results/gpu-session}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
if [ "$DRY" -eq 0 ] && ! $py -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "no CUDA device: skipped; the steps a GPU machine would run:"
    DRY=1
fi
if [ "$DRY" -eq 1 ]; then
    # What the Python side would call, resolved and bound without running it (a rename elsewhere fails here).
    $py bench/gpu_first.py --dry-run >/dev/null || exit 1
else
    mkdir -p "$RESULTS"
    if [ -n "${PACK:-}" ]; then
        trap 'tar czf "$PACK" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")"' EXIT
    fi
fi
status=0
planned=0
step() {  # step NAME EXPECTED_SECONDS COMMAND...: run it capped at twice its expected time and at the deadline,
    local name=$1 expected=$2  # log it to $RESULTS/NAME.log, note a failure, go on
    shift 2
    planned=$((planned + expected))
    if [ "$DRY" -eq 1 ]; then
        printf '  %-14s ~%4s s  %s\n' "$name" "$expected" "$*"
        return
    fi
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 15 ]; then
        echo "=== $name: skipped, the session deadline ($DEADLINE s) has come" | tee "$RESULTS/$name.log"
        status=1
        return
    fi
    local cap=$((2 * expected))
    [ "$cap" -gt "$left" ] && cap=$left
    echo "=== $name (expected ~$expected s, cap $cap s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$cap" "$@" 2>&1 | tee "$RESULTS/$name.log"
    local rc=${PIPESTATUS[0]}
    case $rc in 124 | 137) echo "=== $name: stopped at its cap or the session deadline" | tee -a "$RESULTS/$name.log" ;; esac
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || status=1
}

if [ "$DRY" -eq 0 ]; then
    # bench_quant compares with HQQ, a test-only package a bare GPU machine may lack: install wheels carried
    # in .whl/ (hqq and its small dependencies) into a scratch site. `first` needs none of it.
    if [ "$what" = checks ] && ! $py -c "import hqq" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
        site=$(mktemp -d)
        $py -m pip install -q --no-deps --no-index --target "$site" .whl/*.whl && export PYTHONPATH="$PYTHONPATH:$site"
    fi
    # The host tier page-locks its memory with cudaHostRegister; some sandboxed GPU runtimes refuse that.
    $py -c "import sys, torch; t = torch.empty(1 << 20, dtype=torch.uint8); \
sys.exit(3 if int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel(), 1)) else 0)"
    if [ $? -eq 3 ]; then
        echo "cudaHostRegister is refused here: pinning through torch's allocator (MOE_OFFLOAD_PINNED=torch)" \
            | tee "$RESULTS/pinning.txt"
        export MOE_OFFLOAD_PINNED=torch
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv \
        | tee "$RESULTS/device.csv"
fi

first=(bench/gpu_first.py --out "$RESULTS/first-gpu.json")
case "$what" in
first)
    # Expected seconds: a warm H100, the machine's own torch and Triton; the slices (6 GB of bf16) in /tmp.
    step env 10 $py "${first[@]}" --stage env
    # The CUDA invariance tests first: tokens independent of budgets and prefetch on real streams, the
    # fused kernels, no allocation on the copy path, peak VRAM and prefill workspace within the plan, the
    # attention kernel the plan assumes, one host read per layer, close() giving the memory back.
    step pytest-gpu 100 $py -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py tests/test_quant.py \
        tests/test_model.py tests/test_profile.py tests/test_lut.py
    step slice 60 $py "${first[@]}" --stage slice
    step profile 45 $py "${first[@]}" --stage profile
    step h2d 15 $py "${first[@]}" --stage h2d
    step compare 60 $py "${first[@]}" --stage compare
    step gemv 40 $py "${first[@]}" --stage gemv
    [ "$DRY" -eq 0 ] && rm -rf /tmp/moe-offload-first-gpu
    ;;
checks)
    # The second family on CUDA: the shipped MoLE checkpoint run as trained (its experts through the store's
    # copy streams); its greedy tokens should equal the CPU's for the first tokens at least.
    step mole 30 $py -m cli.main generate lut/demo_model "The with statement is used to" --device cuda \
        --dtype float32 --max-new-tokens 32 --temperature 0 --json
    # What the measured costs choose with --cpu-experts auto (settings.cpu_expert_costs in profile.json).
    slice=$([ "$DRY" -eq 1 ] && echo /tmp/XXXX || mktemp -d)/mixtral-slice
    step write-slice 30 $py -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; \
from bench_offload import write_mixtral_slice; write_mixtral_slice(Path(sys.argv[1]), 2)" "$slice"
    step profile-auto 45 $py -m cli.main profile "$slice" --vram 3GiB --prefetch 1 --context 512 -n 24 \
        --out "$RESULTS/profile-auto"
    [ "$DRY" -eq 0 ] && rm -rf "$(dirname "$slice")"
    step bench-offload 180 $py bench/bench_offload.py --slice-layers 4 --out "$RESULTS/offload-gpu.json"
    if [ "$DRY" -eq 1 ] || $py -c "import hqq" 2>/dev/null; then
        step bench-quant 120 $py bench/bench_quant.py --out "$RESULTS/quant-cuda.json"
    else
        echo "=== bench-quant: skipped, hqq is not installed (carry its wheel: /work/.library/device/README.md)"
    fi
    ;;
families)
    # 4 layers of Qwen3-30B-A3B's dimensions (128 experts of 9 MiB in bf16, top-8): time per token resident, with a
    # quarter of the experts on the device, 4-bit, and transformers; bytes against the pinned-H2D transfer bound.
    step finegrained 260 $py bench/bench_finegrained.py --layers 4 --device cuda --out "$RESULTS/finegrained-gpu.json"
    # 2 layers of DeepSeek-V2-Lite's dimensions (latent attention, 64 experts of 16.5 MiB in bf16, top-6, 2 shared):
    # resident, a quarter on the device, transformers; KV cache bytes per token, latent against expanded.
    step deepseek 90 $py bench/bench_deepseek.py --layers 2 --device cuda --out "$RESULTS/deepseek-gpu.json"
    # Every family's oracle and budget tests (CPU float32 by design: the families' math, not the GPU's rounding).
    step family-tests 190 $py -m pytest -q -p no:cacheprovider tests/test_qwen_moe.py tests/test_olmoe.py \
        tests/test_deepseek.py tests/test_gpt_oss.py
    ;;
compare)
    # compare.py saves its record after each contender: a run stopped at the deadline keeps what it measured.
    step compare 400 $py bench/compare.py --slice-layers 4 --vram 6GiB --repeats 2 --tokens 16 \
        --out "$RESULTS/compare-gpu.json"
    # The README's Performance table, from whatever the record holds (a run cut short included): outside the
    # deadline, since it reads a file and takes a second.
    if [ "$DRY" -eq 0 ] && [ -f "$RESULTS/compare-gpu.json" ]; then
        $py bench/compare.py --table "$RESULTS/compare-gpu.json" | tee "$RESULTS/table.md"
    fi
    ;;
esac
if [ "$DRY" -eq 1 ]; then
    echo "  expected in all: ~$planned s (deadline $DEADLINE s)"
    exit 0
fi
exit $status
