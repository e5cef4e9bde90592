#!/usr/bin/env bash
# Everything that only a GPU can show, in two runs that each fit one 10-minute call on a lent H100.
# From the repository root, with the repository's own packages (no install needed):
#
#   bash bench/gpu_session.sh checks    # a profile trace, gpu tests, offload sweep, fused kernels
#   bash bench/gpu_session.sh compare   # bench/compare on a 4-layer Mixtral-shaped slice, 6 GiB
#
# Records, logs and the profile land in $RESULTS (default bench/results/gpu-session, which git ignores); the
# records to keep are then copied into bench/results/ by hand. Through the device tool, which brings back
# only a few files of its $OUT, pack them into one: `PACK=$OUT/checks.tgz bash bench/gpu_session.sh checks`.
# bench_quant's HQQ columns need the hqq package (carried as wheels in .whl/, see below): without it that
# benchmark is skipped and says so.
#
# Every step runs under one deadline, DEADLINE seconds from the start (default 540: a 10-minute call, less
# time to pack the results), so a slow step cannot take the whole call's output with it: what is most
# wanted runs first, a step that reaches the deadline is stopped, and later ones are skipped. With
# PACK=file.tgz, $RESULTS is packed into that file on exit.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-}
RESULTS=${RESULTS:-bench/results/gpu-session}
DEADLINE=${DEADLINE:-540}
mkdir -p "$RESULTS"
if [ -n "${PACK:-}" ]; then
    trap 'tar czf "$PACK" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")"' EXIT
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
# bench_quant compares with HQQ, a test-only package a bare GPU machine may lack: install wheels carried in
# .whl/ (hqq and its small dependencies: pip download/wheel them where there is network) into a scratch site.
if ! $py -c "import hqq" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    site=$(mktemp -d)
    $py -m pip install -q --no-deps --no-index --target "$site" .whl/*.whl && export PYTHONPATH="$PYTHONPATH:$site"
fi
status=0
step() {  # step NAME COMMAND...: run it (until the deadline), log it to $RESULTS/NAME.log, note a failure, go on
    local name=$1
    shift
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 15 ]; then
        echo "=== $name: skipped, the session deadline ($DEADLINE s) has come" | tee "$RESULTS/$name.log"
        status=1
        return
    fi
    echo "=== $name: $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$left" "$@" 2>&1 | tee "$RESULTS/$name.log"
    local rc=${PIPESTATUS[0]}
    case $rc in 124 | 137) echo "=== $name: stopped at the session deadline" | tee -a "$RESULTS/$name.log" ;; esac
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || status=1
}

if ! $py -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "no CUDA device: these runs are for a GPU machine (on CPU, run the benchmarks themselves)" >&2
    exit 2
fi
# The host tier page-locks its memory with cudaHostRegister; some sandboxed GPU runtimes refuse that.
$py -c "import sys, torch; t = torch.empty(1 << 20, dtype=torch.uint8); \
sys.exit(3 if int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel(), 1)) else 0)"
probe=$?
if [ "$probe" -eq 3 ]; then
    echo "cudaHostRegister is refused here: pinning through torch's allocator (MOE_OFFLOAD_PINNED=torch)" \
        | tee "$RESULTS/pinning.txt"
    export MOE_OFFLOAD_PINNED=torch
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv \
    | tee "$RESULTS/device.csv"

case "$what" in
checks)
    # First what only a GPU shows: a profile where copies must overlap compute. 2 Mixtral-shaped layers (16
    # experts of 352 MB), room for 6 of them next to the dense part, router-ahead prefetch one layer ahead.
    slice=$(mktemp -d)/mixtral-slice
    step write-slice $py -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; \
from bench_offload import write_mixtral_slice; write_mixtral_slice(Path(sys.argv[1]), 2)" "$slice"
    step inspect $py -m cli.main inspect "$slice" --vram 3GiB --context 512
    # Misses copied (not computed on the CPU), so the trace shows the copy stream; then the same run with
    # --cpu-experts auto, to see what the measured costs choose (settings.cpu_expert_costs in profile.json).
    step profile $py -m cli.main profile "$slice" --vram 3GiB --prefetch 1 --context 512 -n 24 --cpu-experts never \
        --out "$RESULTS/profile"
    step profile-auto $py -m cli.main profile "$slice" --vram 3GiB --prefetch 1 --context 512 -n 24 \
        --out "$RESULTS/profile-auto"
    rm -rf "$(dirname "$slice")"
    # The second family on CUDA: the shipped MoLE checkpoint run as trained (its experts through the store's
    # copy stream); its greedy tokens should equal the CPU's for the first tokens at least.
    step mole $py -m cli.main generate lut/demo_model "The with statement is used to" --device cuda --dtype float32 \
        --max-new-tokens 32 --temperature 0 --json
    step pytest-gpu $py -m pytest -m gpu -q -p no:cacheprovider tests
    step bench-offload $py bench/bench_offload.py --slice-layers 4 --out "$RESULTS/offload-gpu.json"
    if $py -c "import hqq" 2>/dev/null; then
        step bench-quant $py bench/bench_quant.py --out "$RESULTS/quant-cuda.json"
    else
        echo "=== bench-quant: skipped, hqq is not installed (carry its wheel: /work/.library/device/README.md)"
    fi
    ;;
compare)
    # compare.py saves its record after each contender: a run stopped at the deadline keeps what it measured.
    step compare $py bench/compare.py --slice-layers 4 --vram 6GiB --repeats 2 --tokens 16 \
        --out "$RESULTS/compare-gpu.json"
    # The README's Performance table, from whatever the record holds (a run cut short included): outside the
    # deadline, since it reads a file and takes a second.
    if [ -f "$RESULTS/compare-gpu.json" ]; then
        $py bench/compare.py --table "$RESULTS/compare-gpu.json" | tee "$RESULTS/table.md"
    fi
    ;;
*)
    echo "usage: [RESULTS=folder] [PACK=file.tgz] [DEADLINE=seconds] bash bench/gpu_session.sh checks|compare" >&2
    exit 2
    ;;
esac
exit $status
