#!/usr/bin/env bash
# One prepared check for a lent GPU machine (one H200/H100, 16 cores, Python 3.12 with torch,
# no internet; see ../shared/reference/stack.md "A GPU machine"). Run from the repository root:
#
#     OUT=/some/empty/folder bash scripts/gpu_check.sh
#
# 1. installs the carried wheels in .whl/ (gitignored; carry it) and clbench itself (not editable)
#    into a --target folder put first on PYTHONPATH; commands then run outside the checkout so
#    the source folder cannot shadow the installed package;
# 2. `python -m clbench.perf --sections e2e`: a synthetic ImageNet-R-shaped JPEG tree, SD-LoRA
#    3 tasks × 1 epoch through `clbench run` with a random-init ViT-B/16 under bf16 and fp32,
#    next to model-only and loader-only images/s (ratios) and the official schedule extrapolated;
# 3. in parallel (not timing): the `digits` default job with 3 seeds under bf16 and under fp32
#    (accuracy comparison), every method for 1 epoch under bf16 (no dtype error), and the
#    bf16-vs-fp32 training-loss curves of a ViT-B/16 on synthetic data;
# 4. a compact summary ($OUT/summary.txt). Every step has its own timeout; logs and results.json
#    files in $OUT/details.tar.gz.
#
# Environment: CLBENCH_GPU_CHECK_TINY=1 (CPU dry run: tiny backbone, tiny tree, fp32, few
# methods/seeds), CLBENCH_GPU_CHECK_SKIP_WHEELS=1 (the host already has Avalanche & co.),
# PYTHON (default python3), CLBENCH_GPU_CHECK_TARGET / CLBENCH_GPU_CHECK_WORK (scratch folders),
# CLBENCH_GPU_CHECK_BUDGET (seconds for the whole script, default 540).
set -u
{  # parsed whole before it runs: editing this file during a run cannot change the run
: "${OUT:?set OUT to the folder that receives the results}"
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
TINY=${CLBENCH_GPU_CHECK_TINY:-0}
TARGET=${CLBENCH_GPU_CHECK_TARGET:-/tmp/clbench-gpu-check/target}
WORK=${CLBENCH_GPU_CHECK_WORK:-/tmp/clbench-gpu-check/work}
BUDGET=${CLBENCH_GPU_CHECK_BUDGET:-540}
START=$(date +%s)
# A fresh target: pip --target keeps a package folder that already exists there, so an earlier
# run's clbench would shadow this checkout's.
rm -rf "$TARGET"
mkdir -p "$OUT/logs" "$TARGET" "$WORK"
STEPS="$OUT/steps.txt"
export PY REPO TARGET
: > "$STEPS"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME SECONDS CMD...: run with a timeout capped by what is left of the budget.
step() {
  local name=$1 limit=$2; shift 2
  local rest; rest=$(left)
  (( rest < limit )) && limit=$rest
  if (( limit < 10 )); then echo "$name: skipped (budget spent)" | tee -a "$STEPS"; return 124; fi
  local began=$(date +%s)
  if declare -F "$1" > /dev/null; then  # a shell function: timeout needs a program
    timeout -k 10 "$limit" bash -c "$(declare -f "$1" precision); \"\$@\"" _ "$@" > "$OUT/logs/$name.log" 2>&1
  else
    timeout -k 10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  fi
  local rc=$?
  echo "$name: rc=$rc in $(( $(date +%s) - began ))s (limit ${limit}s)" | tee -a "$STEPS"
  return $rc
}

# ---------------------------------------------------------------------------------- 1. install
{ nvidia-smi 2>&1 | head -15; echo; $PY --version; nproc; free -g | head -2; } > "$OUT/logs/machine.log" 2>&1

install_wheels() {
  if [[ "${CLBENCH_GPU_CHECK_SKIP_WHEELS:-0}" == 1 ]]; then echo "wheels skipped"; return 0; fi
  local wheels=("$REPO"/.whl/*.whl) w mod
  for w in "$REPO"/.whl/if-missing/*.whl; do  # only where the host lacks them: never shadow its own
    mod=$(basename "$w" | cut -d- -f1 | tr 'A-Z' 'a-z')
    [[ $mod == protobuf ]] && mod=google.protobuf
    $PY -c "import $mod" 2> /dev/null || { echo "host lacks $mod: installing $(basename "$w")"; wheels+=("$w"); }
  done
  (( ${#wheels[@]} )) || { echo "no wheels in $REPO/.whl"; return 1; }
  $PY -m pip install --no-index --no-deps --target "$TARGET" "${wheels[@]}"
}

install_clbench() {
  # Not editable; a copy of the same layout when the host's pip cannot build it.
  if ! $PY -m pip install --no-deps --no-build-isolation --target "$TARGET" "$REPO"; then
    echo "pip could not build clbench; copying the package layout instead"
    rm -rf "$TARGET/clbench"
    cp -r "$REPO/clbench" "$TARGET/clbench"
    cp -r "$REPO/methods" "$TARGET/clbench/methods"
    cp -r "$REPO/benchmarks" "$TARGET/clbench/benchmarks"
  fi
}

step install_wheels 150 install_wheels
step install_clbench 90 install_clbench
export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
cd "$WORK" || exit 1
step imports 60 $PY -c "import clbench, clbench.perf, avalanche, timm, torch; print(clbench.__file__, torch.__version__, torch.cuda.is_available())"

if $PY -m clbench run --help 2>/dev/null | grep -q -- "--precision"; then HAS_PRECISION=1; else HAS_PRECISION=0; fi
precision() { if (( HAS_PRECISION )); then echo "--precision $1"; fi; }
echo "clbench run --precision available: $HAS_PRECISION" | tee -a "$STEPS"

# ---------------------------------------------------------------------------------- sizes
if [[ "$TINY" == 1 ]]; then
  DEVICE=cpu; SHAPES=tiny; PRECISIONS=fp32; LOSS_PRECISIONS=fp32; HIGH=fp32
  E2E="--e2e-tasks 2 --e2e-classes-per-task 3 --e2e-train-per-class 8 --e2e-test-per-class 4 --e2e-side 64 --e2e-model-steps 3 --workers 2"
  LOSS="--losscurve-steps 10 --losscurve-batch 8 --losscurve-lr 1e-3"
  DIGITS="--methods finetune,sdlora --epochs 1"; SEEDS="1993 1994"
  ALL="--methods all --epochs 1 --seeds 1993"
else
  DEVICE=cuda; SHAPES=vit-b16; PRECISIONS=${CLBENCH_GPU_CHECK_E2E_PRECISIONS:-bf16,fp32}
  LOSS_PRECISIONS=bf16,fp32; HIGH=bf16
  E2E="--e2e-tasks 3 --e2e-epochs 3 --e2e-classes-per-task 20 --e2e-train-per-class 120 --e2e-test-per-class 30 --e2e-side 448"
  LOSS="--losscurve-steps 100 --losscurve-batch 64 --losscurve-lr 1e-4"
  DIGITS=""; SEEDS="1993 1994 1995"
  ALL="--methods all --epochs 1 --seeds 1993"
fi

export PY REPO TARGET WORK DEVICE DIGITS SEEDS ALL HIGH HAS_PRECISION

# ---------------------------------------------------------------------------------- 2. speed
# Alone on the machine: these are the timing figures.
step perf_e2e 330 $PY -m clbench.perf --sections e2e --device $DEVICE --shapes $SHAPES \
  --precisions $PRECISIONS $E2E --e2e-data "$WORK/e2e" --json "$OUT/perf_e2e.json"
# The loop's own cost: finetune trains the whole backbone, as the model-only rate does.
step perf_e2e_finetune 120 $PY -m clbench.perf --sections e2e --device $DEVICE --shapes $SHAPES \
  --precisions $HIGH $E2E --e2e-method finetune --e2e-data "$WORK/e2e" --json "$OUT/perf_e2e_finetune.json"
# Where the main process spends its time in a run (cProfile; the run itself is slower under it).
profile_run() {
  local backbone="--backbone vit-tiny-letters"
  [[ -f "$WORK/e2e/vit_b16_random_init.safetensors" ]] && \
    backbone="--backbone vit-b16-in21k-ft-in1k --checkpoint $WORK/e2e/vit_b16_random_init.safetensors"
  rm -rf "$WORK/profile-runs"
  $PY -m cProfile -o "$WORK/profile.pstats" -m clbench run --plugin clbench.perf.synthetic_bench \
    --bench imagenet-r-synthetic --data-dir "$WORK/e2e" --tasks 3 --methods sdlora --epochs 3 \
    --workers "$(nproc)" --device $DEVICE $(precision $HIGH) $backbone --out "$WORK/profile-runs" --no-report
  $PY -c "import pstats, sys; s = pstats.Stats(sys.argv[1], stream=sys.stdout)
s.sort_stats('tottime').print_stats(30); s.sort_stats('cumulative').print_stats(45)" "$WORK/profile.pstats"
}
step profile 120 profile_run
if [[ "${CLBENCH_GPU_CHECK_ONLY:-all}" != speed ]]; then
  step perf_e2e_decoded 150 $PY -m clbench.perf --sections e2e --device $DEVICE --shapes $SHAPES \
    --precisions $HIGH $E2E --e2e-decoded-cache --e2e-data "$WORK/e2e" --json "$OUT/perf_e2e_decoded.json"
fi
mkdir -p "$OUT/e2e_runs"
(cd "$WORK/e2e/runs" && find . -name results.json -exec cp --parents {} "$OUT/e2e_runs/" \;) 2>/dev/null

# ---------------------------------------------------------------------------------- 3. accuracy, dtypes
# Not timing: one process per (precision, seed) and the all-methods run share the GPU (a tiny
# model leaves it mostly idle), the loss curves run meanwhile.
run_digits() {  # precision seed
  $PY -m clbench run --device $DEVICE $DIGITS --seeds "$2" $(precision "$1") --out "$WORK/runs" --name "digits-$1-seed$2" --no-report
}
run_all() {
  $PY -m clbench run --device $DEVICE $ALL $(precision $HIGH) --out "$WORK/runs" --name "all-$HIGH" --no-report
}
if [[ "${CLBENCH_GPU_CHECK_ONLY:-all}" != speed ]]; then
PAR=$(( $(left) - 20 )); (( PAR > 420 )) && PAR=420
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # up to eight processes share the cores here
PIDS=()
DIGIT_PRECISIONS=$HIGH; [[ "$TINY" != 1 ]] && DIGIT_PRECISIONS="bf16 fp32"
for p in $DIGIT_PRECISIONS; do
  for seed in $SEEDS; do step digits_${p}_seed$seed $PAR run_digits $p $seed & PIDS+=($!); done
done
step all_methods_$HIGH $PAR run_all & PIDS+=($!)
step losscurve 150 $PY -m clbench.perf --sections losscurve --device $DEVICE --shapes $SHAPES \
  --losscurve-precisions $LOSS_PRECISIONS $LOSS --json "$OUT/perf_losscurve.json"
wait "${PIDS[@]}"
mkdir -p "$OUT/runs"
(cd "$WORK/runs" && find . -name results.json -exec cp --parents {} "$OUT/runs/" \;) 2>/dev/null
fi

# ---------------------------------------------------------------------------------- 4. summary
$PY - "$OUT" "$HAS_PRECISION" <<'EOF' 2>&1 | tee "$OUT/summary.txt"
import json, statistics, sys
from collections import defaultdict
from pathlib import Path

out, has_precision = Path(sys.argv[1]), sys.argv[2] == "1"
print("== clbench GPU check summary ==")
print((out / "steps.txt").read_text().strip())
for name in ("perf_e2e", "perf_e2e_finetune", "perf_e2e_decoded"):
    e2e_path, log_path = out / f"{name}.json", out / "logs" / f"{name}.log"
    if not e2e_path.is_file():
        if log_path.is_file():  # it ran and failed
            log = log_path.read_text(errors="replace").splitlines()
            print(f"\n[{name}] no figures; the end of its log:\n  " + "\n  ".join(log[-15:]))
        continue
    e = json.loads(e2e_path.read_text())["e2e"]
    ld = e["loader"]
    print(f"\n[{name}] {e['method']} {e['tasks']} tasks x {e['epochs']} epochs, batch {e['batch']}, "
          f"{e['workers']} workers, tree {e['tree']['n_train']}+{e['tree']['n_test']} JPEGs "
          f"({e['tree']['mean_kb']:.0f} KB, written in {e['tree']['seconds']:.0f}s)")
    built = ld.get("decoded_cache_build_s")
    print(f"  loader alone ({ld.get('source', 'JPEG')}): train {ld['train_images_per_s']:.0f} img/s, "
          f"test {ld['test_images_per_s']:.0f} img/s"
          + (f" (cache built in {built:.1f}s)" if built is not None else ""))
    for p, r in e["precisions"].items():
        m = r["model"]
        line = f"  {p}: model train {m['train_images_per_s']:.0f} eval {m['eval_images_per_s']:.0f} img/s"
        if "run" in r:
            run, q, o = r["run"], r["ratios"], r["official_schedule"]
            line += (f" | run train {run['train_images_per_s']:.0f} ({q['train_vs_floor']:.2f}x min) "
                     f"eval {run['eval_images_per_s']:.0f} ({q['eval_vs_floor']:.2f}x min) img/s | "
                     f"official schedule {o['total_min']:.1f} min | to first step "
                     f"{run.get('to_first_step_s', 0):.2f}s/task | run precision {run['run_precision']}"
                     f" | seconds per task {[(round(t['train_s'], 1), round(t['eval_s'], 1)) for t in run['tasks']]}")
        else:
            line += f" | run FAILED: {r.get('error')}"
        print(line)
profile_log = out / "logs" / "profile.log"
if profile_log.is_file():
    lines = profile_log.read_text(errors="replace").splitlines()
    start = next((i for i, l in enumerate(lines) if "tottime" in l), len(lines))
    print("\n[profile] main process, by own time:\n" + "\n".join(l[:160] for l in lines[start:start + 28]))
loss_path = out / "perf_losscurve.json"
if loss_path.is_file():
    c = json.loads(loss_path.read_text())["losscurve"]
    print(f"\n[losscurve] {c['steps']} steps, batch {c['batch']}, {c['shapes']}:")
    for p in c["curves"]:
        print(f"  {p}: {c['first_window_mean'][p]:.4f} -> {c['last_window_mean'][p]:.4f}, "
              f"max |diff| per step vs {c['reference']} {c['max_abs_step_difference_vs_reference'][p]:.4f}")
acc = defaultdict(lambda: defaultdict(list))
status = {}
for path in sorted((out / "runs").glob("*/*/*/seed-*/results.json")):
    r = json.loads(path.read_text())
    run = path.parts[-5].split("-seed")[0]
    done = r.get("complete") or r.get("status") == "complete"
    if run.startswith("all-"):
        status[r["method"]] = "complete" if done else f"stopped after {len(r['total'])} tasks"
    elif done:
        acc[r["method"]][run].append(r["metrics"]["final_acc"])
if acc:
    print(f"\n[digits] final accuracy %, mean ± sd over seeds (precision flag passed: {has_precision})")
    runs = sorted({run for v in acc.values() for run in v})
    print("  method".ljust(18) + "".join(f"{run:>22}" for run in runs))
    for method in sorted(acc):
        cells = []
        for run in runs:
            v = acc[method].get(run, [])
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.mean(v):.2f} ± {sd:.2f} (n={len(v)})" if v else "-")
        print(f"  {method:<16}" + "".join(f"{c:>22}" for c in cells))
if status:
    print(f"\n[all methods, 1 epoch] " + ", ".join(f"{m}: {s}" for m, s in sorted(status.items())))
print(f"\nfiles: {out}")
EOF
echo "total $(( $(date +%s) - START ))s" | tee -a "$OUT/summary.txt"
# Few files come back from a lent machine: logs and results travel as one archive.
(cd "$OUT" && tar czf details.tar.gz $(ls -d logs runs e2e_runs 2> /dev/null) && rm -rf logs runs e2e_runs)
exit 0
}
