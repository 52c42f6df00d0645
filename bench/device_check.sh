#!/usr/bin/env bash
# The device check: everything in overlap that needs a GPU, in one command, in about 12 minutes on
# one H100/H200, offline. Run it from the repository root on a CUDA machine:
#
#     bash bench/device_check.sh            # logs under $OUT if set, else ./device-check-<time>/
#
# Steps (each under its own time limit; a failed or timed-out step does not stop the others):
#   1. tests/test_cuda.py            the ops (2 and 4 ranks sharing one GPU), the scheduler, the
#                                    fire-and-forget setup, allocator pressure, device-time report,
#                                    0 host syncs per overlapped forward, the transformers integration
#   2. python -m overlap demo --device cuda            (its default cuda shape, T2048 H4096)
#   3. bench --device cuda --comm-ratio 1, T1024, H 4096 and H 7168, m = 1, 2, 4
#   4. the window transport (the CUDA IPC window), no emulation: T4096 H7168 E64 K8 I2048 int8,
#      2 ranks, m = 2, HCCL_BUFFSIZE=4096 (a device setup's bound is its whole send buffer)
#   5. python bench/bench_kernels.py --device cuda     (layout time, kernels % of copy_)
#   6. python bench/bench_experts.py --device cuda     (grouped GEMM vs the expert loop; the CUDA-graph
#                                                      replay of the grouped path, at 8192 and 256 rows)
#   7. python bench/bench_exchange.py --device cuda, 2 and 4 ranks (exchange vs copy_, setup host
#      time behind a queued kernel, host syncs; window and gloo-staged)
#   8. python -m overlap bench --device cpu, 2 and 4 ranks (this host's cores: the many-core figures)
#   9. python bench/bench_cpu_plan.py          (CPU plan and OpenMP environment, side by side)
#      (8 and 9 last; DEVICE_CHECK_CPU=0 skips them. Step limits add up to about 12 minutes.)
# then prints a short summary: each step's status, time and last lines, and issue 21's figures
# (bench/device_figures.py: PASS / FAIL / PENDING each).
#
# The image needs torch, networkx, numpy, matplotlib and pytest; not pytest-asyncio, pytest-timeout
# or the hf extra. Missing packages can travel as wheels in ./.whl (installed into /tmp/site, no
# network). The project runs from a copy of this checkout (no pip install needed): the top-level
# kernels/ folder ships as overlap.kernels, so the copy puts it there.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
LOG=${OUT:-$ROOT/device-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 TORCH_DEVICE_BACKEND_AUTOLOAD=0

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# A shadow tree: overlap/ with kernels/ inside it (as installed), tests/, bench/ and pyproject.toml.
# Every step runs in it, so `overlap` resolves there whatever pytest puts first on sys.path.
SHADOW=$(mktemp -d /tmp/overlap-src.XXXX)
cp -r "$ROOT/overlap" "$ROOT/tests" "$ROOT/bench" "$ROOT/pyproject.toml" "$SHADOW/"
rm -rf "$SHADOW/overlap/kernels"
cp -r "$ROOT/kernels" "$SHADOW/overlap/kernels"
export PYTHONPATH=$SHADOW${PYTHONPATH:+:$PYTHONPATH}
cd "$SHADOW"

python3 - <<'EOF' | tee "$LOG/host.txt"
import os, torch
print(f"torch {torch.__version__}, cuda {torch.version.cuda}, gpus {torch.cuda.device_count()}, "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}, cpus {os.cpu_count()}")
EOF

names=() statuses=() times=()
step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS rc
    echo "== $name: $*" | tee "$LOG/$name.log"
    timeout --kill-after=10 "$limit" "$@" >>"$LOG/$name.log" 2>&1
    rc=$?
    names+=("$name") times+=($((SECONDS - t0)))
    if [ $rc -eq 0 ]; then statuses+=("ok"); elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        statuses+=("TIMEOUT(${limit}s)"); else statuses+=("FAIL(rc=$rc)"); fi
    tail -n +2 "$LOG/$name.log" | tail -n 4
}

# pytest without pytest-asyncio / pytest-timeout: their ini options only warn; no asyncio test is run.
step cuda-tests 180 python3 -m pytest -q -p no:cacheprovider -W ignore::pytest.PytestConfigWarning \
    -m cuda -rs -s tests/test_cuda.py
# --- devlayer: issue 21's layer figures (demo shape, comm = compute benches, window run, experts) ---
step demo-cuda 45 python3 -m overlap demo --device cuda --ranks 2 --out "$LOG/demo-cuda"
for H in 4096 7168; do
    step "bench-h$H" 80 python3 -m overlap bench --device cuda --ranks 2 --comm-ratio 1 --tokens 1024 \
        --hidden "$H" --experts 8 --top-k 2 --intermediate 2048 --shared 1 --microbatches 1 2 4 --reps 4 \
        --json "$LOG/bench-h$H.json"
done
if python3 -m overlap bench --help 2>/dev/null | grep -q "window"; then
    # cudawin (issue 20): the CUDA IPC window; a combine's send buffer (capacity rows, 940 MB here)
    # bounds each peer's region on a device setup, so the window is raised to 4 GB per rank.
    step window 90 env HCCL_BUFFSIZE=4096 python3 -m overlap bench --device cuda --ranks 2 --transport window --tokens 4096 \
        --hidden 7168 --experts 64 --top-k 8 --intermediate 2048 --shared 0 --quant 2 --microbatches 2 \
        --reps 3 --json "$LOG/window.json"
else
    echo "== window: pending (python -m overlap bench has no --transport window yet)" | tee "$LOG/window.log"
fi
# --- end devlayer ---
step kernels-cuda 40 python3 bench/bench_kernels.py --device cuda
step experts-cuda 25 python3 bench/bench_experts.py --device cuda --experts 16 --rows 8192 --hidden 4096 \
    --inter 1536 --cuda-graph --json "$LOG/experts-cuda.json"
# issue 21's CUDA-graphs trial at a microbatch's size (128 tokens x top-2 on 2 ranks): launch-bound
step experts-graph-cuda 15 python3 bench/bench_experts.py --device cuda --experts 8 --rows 256 --hidden 4096 \
    --inter 1536 --cuda-graph --repeat 20 --json "$LOG/experts-graph-cuda.json"

# ---- issue 20 (transport helper): the window transport's GPU figures --------------------------
# One exchange per rank of 4096 rows (512 tokens x top-8) of 7168
# bf16 against copy_ of the same bytes, 2 and 4 ranks sharing the GPU; then the setup's host time
# behind a queued 200 ms kernel (bound 100 us) and host syncs under set_sync_debug_mode("error")
# (bound: none). Both carriers run: window (the CUDA IPC window, opt-in) and gloo (gloo-staged).
step exchange-cuda-2 50 python3 bench/bench_exchange.py --device cuda --ranks 2 --reps 5 --host-checks
step exchange-cuda-4 40 python3 bench/bench_exchange.py --device cuda --ranks 4 --reps 5
# ---- end of issue 20's block -------------------------------------------------------------------

# The CPU steps come last (the device figures first); DEVICE_CHECK_CPU=0 skips them when the lent
# time is short.
if [ "${DEVICE_CHECK_CPU:-1}" != 0 ]; then
# --- cpuplan (issue 22): this host's cores, 2 and 4 ranks (m = 2 >= 1.3x, no row slower than serial),
# and side by side in one run: the CPU plan on the caller's thread vs on comm workers, and the
# ranks' OpenMP environment (as is / passive / passive + OMP_NUM_THREADS), 2 ranks of 7 threads.
for R in 2 4; do
    step "bench-cpu-r$R" 35 python3 -m overlap bench --device cpu --ranks "$R" --reps 3 --json "$LOG/bench-cpu-r$R.json"
done
step cpu-plan 30 python3 bench/bench_cpu_plan.py --reps 3 --rounds 2 --threads 7 --microbatches 2 4
# --- end cpuplan
fi

echo
echo "== device check summary ($(head -n 1 "$LOG/host.txt"))"
for i in "${!names[@]}"; do
    printf '%-13s %-16s %4ss\n' "${names[$i]}" "${statuses[$i]}" "${times[$i]}"
done
grep -E "passed|failed|skipped|error" "$LOG/cuda-tests.log" | tail -n 1
grep -E "^rank [0-9]+: dispatch_setup" "$LOG/cuda-tests.log" | head -n 2
# --- kernels (cpukern, issue 21 item 3): the dispatch layout's time at 4096 tokens, the lowest Triton
# kernel's % of copy_ over every bench shape, and whether every kernel's bits equal the reference.
# The full table (each kernel's GB/s, % of copy_ and host launch µs per shape) is in kernels-cuda.log.
grep -E "^summary:" "$LOG/kernels-cuda.log" | sed 's/^summary:/kernels:/'
# --- end kernels
echo
echo "== issue 21's figures"
python3 "$ROOT/bench/device_figures.py" "$LOG"
grep -hE "^(transport|window|rank [0-9]+ \()" "$LOG"/exchange-cuda-*.log 2>/dev/null | head -n 8  # issue 20
echo "logs: $LOG"
rm -rf "$SHADOW"
for s in "${statuses[@]}"; do [ "$s" = ok ] || exit 1; done
