#!/usr/bin/env bash
# The GPU checks and measurements, in stages, for a GPU machine without network access.
#   setup  : install wheels copied along, the mdistiller checkout and this package; stage the data
#   stage  : only copy the data into $DATA (layout: $DATA/cifar100/*.npz, $DATA/teachers/cifar100/*.pt)
#   checks : the 15 CUDA tests (CUDA_TESTS below: fused loss, no host sync for the temperature sums, graph vs eager with mutations, packed graph vs
#            solo eager, fused students in the graph, fp32 and bf16 channels_last, nvJPEG pipeline) with the staged data
#   losses : benchmarks/loss_speed.py
#   train  : benchmarks/trainer_speed.py, then the base-vs-fast accuracy parity runs
#   fused  : the short fused-pack benchmark (resnet56 -> resnet20, K = 1 and 21, serial vs fused, fp32 and bf16,
#            cudnn.benchmark off (as in seeded runs) and on; 12 cases, ~2-3 min). It writes $RES/fuse_speed.csv,
#            which `SOLVER.FAST.FUSE auto` reads in the later stages ($NORMKD_FUSE_TABLE) and gpu_unpack.sh
#            merges into normkd_plugin/engine/fuse_speed.csv
#   pack   : benchmarks/pack_speed.py in full (K = 1, 4, 12, 15, 21, both pairs, fp32 and bf16, serial/branches/fused,
#            cudnn.benchmark off), its fused-vs-serial times into $RES/fuse_speed.csv too
#   ddp    : one-rank NCCL epochs under torchrun (fast with its CUDA graph; ddp; DATASET.DECODE gpu)
#            and benchmarks/imagenet_loader.py (host PIL loader vs nvJPEG pipeline), benchmarks/imagenet_pack.py
#            (a pack of 4 ImageNet runs vs 4 solo runs, compute- and decode-bound; ~6 min)
#   compare: one chunk of the 240-epoch vanilla/KD/DKD/KD+LS/DKD+LS/NormKD/NormDKD x 3 seeds comparison on
#            resnet56 -> resnet20 (one pack of 21 runs, fused where SOLVER.FAST.FUSE auto finds it measured faster), resumed
#            from results/cifar100-res56_res20/runs/. It stops at an epoch
#            boundary within $COMPARE_SECONDS (normkd-train --time-limit; exit 3 = unfinished, run the stage
#            again later) and keeps each run's worklog.txt, config.yaml and provenance.yaml (the SHA-256 of the
#            teacher and data it learned from, checked on resume), plus `latest` (student and
#            optimizer, no teacher; ~2.3 MB per run) while the run is unfinished.
# Inputs live in the ignored folder .dev/ (wheels in .dev/whl, an mdistiller checkout in
# .dev/mdistiller, data in .dev/d*/: npz shards and resnet56-f2eff4c8.pt, two shards per transfer).
#
# On a remote GPU machine whose commands each receive at most 64 MiB of files (the repository plus
# the folders sent along) and return a few files, with the machine kept between commands:
#   first, here: .dev/whl (yacs, tensorboardX wheels), .dev/mdistiller (git archive of $MDISTILLER_SRC),
#     .dev/d1 = train-0, train-1 + the teacher; .dev/d2 = train-2, train-3; .dev/d3 = train-4, test;
#     rm -rf .dev/runs; [ -d results/cifar100-res56_res20/runs ] && mv results/cifar100-res56_res20/runs .dev/runs
#     (the repository's files go with every command: keep the ~28 MB of resume states out of it until
#     the compare command; `git checkout` puts them back)
#   command 1, sending .dev/whl .dev/mdistiller .dev/d1 : bash benchmarks/gpu_checks.sh setup
#   command 2, sending .dev/d2                          : bash benchmarks/gpu_checks.sh stage
#   command 3, sending .dev/d3                          : bash benchmarks/gpu_checks.sh stage checks fused
#   command 4, sending .dev/runs                        : COMPARE_KEEP=.dev/runs bash benchmarks/gpu_checks.sh compare
#   then: bash benchmarks/gpu_unpack.sh <the returned parts> results/gpu-CARD, commit results/cifar100-res56_res20/runs
#     and normkd_plugin/engine/fuse_speed.csv
#
# Durations (replace with the measured ones after each GPU run): none measured yet for this sequence.
# Plan for a 15-minute allocation: machine start 1-2 min; command 1 (setup) ~1 min; command 2 ~0.5 min;
# command 3 (15 CUDA tests + fused benchmark) ~5 min; command 4 with COMPARE_SECONDS = what is left
# less 2 min for the transfers back (about 360).
#
# Results are written to $RES and, after every stage, bundled into $OUT as results.tgz.00, .01, ...
# (parts of at most 15 MiB: few files, whatever the stages wrote). Every stage keeps its whole output
# (tracebacks included) in $RES/*.log; the console shows a summary. Unpack them here with
#   bash benchmarks/gpu_unpack.sh FOLDER_OF_THE_PARTS results/gpu-CARD
# which also replaces results/cifar100-res56_res20/runs/ with a compare chunk's runs and merges the
# fused-pack measurement into normkd_plugin/engine/fuse_speed.csv.
set -uo pipefail
OUT=${OUT:-results/gpu}
RES=${RES:-/tmp/normkd-results}
DATA=${DATA:-/tmp/normkd-data}
CIFAR=$DATA/cifar100 TEACHER=$DATA/teachers/cifar100/resnet56-f2eff4c8.pt
EPOCHS=${PARITY_EPOCHS:-20}
STAGES=${PARITY_STAGES:-[13,15,18]}
# The checks stage: every test that needs CUDA (tests/test_gpu_checks.py checks this selection on a CPU).
CUDA_TESTS=(tests/test_fused.py tests/test_epoch_temperatures.py tests/test_fast_trainer.py tests/test_pack.py tests/test_layout.py tests/test_imagenet.py)
CUDA_SELECT="cuda or gpu"
CUDA_COUNT=15
mkdir -p "$OUT" "$RES" "$CIFAR" "$(dirname "$TEACHER")"
export PYTHONUNBUFFERED=1 NORMKD_DATA=$DATA

stage_data() {
  for d in .dev/d*/; do
    [ -d "$d" ] || continue
    cp -n "$d"*.npz "$CIFAR"/ 2>/dev/null
    cp -n "$d"*.pt "$(dirname "$TEACHER")"/ 2>/dev/null
  done
  ls "$CIFAR" "$(dirname "$TEACHER")"
}
short() { echo SOLVER.EPOCHS 1 SOLVER.LR_DECAY_STAGES "[]" EXPERIMENT.SEED 0; }
bundle() {  # everything in $RES as at most a few parts in $OUT (a transfer returns few files)
  rm -f "$OUT"/results.tgz.*
  tar -C "$RES" -czf - . | split -d -b 15M - "$OUT/results.tgz."
}

for step in "$@"; do
  case "$step" in
  setup)
    python3 -m pip install -q --no-index --no-deps --no-compile .dev/whl/*.whl || exit 1
    python3 -m pip install -q --no-index --no-deps --no-build-isolation .dev/mdistiller . 2>&1 | tee "$RES/setup.log" \
      | grep -v -i warn | tail -3
    python3 -c "import mdistiller, normkd_plugin; print('installed')" || exit 1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$RES/gpu.txt"
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    stage_data ;;
  stage) stage_data ;;
  checks)  # only the CUDA tests (the rest run in CI); they skip, and so fail here, without a GPU
    python3 -P -m pytest -q -p no:cacheprovider -rA -k "$CUDA_SELECT" "${CUDA_TESTS[@]}" 2>&1 | tee "$RES/cuda_tests.log" \
      | grep -E "^(PASSED|FAILED|ERROR|SKIPPED)| (passed|failed|skipped|error)" | tee "$RES/cuda_tests.txt"
    grep -qE "^$CUDA_COUNT passed, [0-9]+ deselected(,| in )" "$RES/cuda_tests.txt" \
      || echo "CUDA tests: not all $CUDA_COUNT passed (the whole output: cuda_tests.log)" | tee -a "$RES/cuda_tests.txt" ;;
  losses) python3 benchmarks/loss_speed.py --out "$RES/loss_speed.md" 2>&1 | tee "$RES/loss_speed.log" ;;
  train)
    python3 benchmarks/trainer_speed.py --data "$CIFAR" --out "$RES/trainer_speed.md" 2>&1 | tee "$RES/trainer_speed.log" \
      | grep -v '^\s*$' | tail -12
    for trainer in base fast; do
      timeout "${PARITY_TIMEOUT:-420}" normkd-train --cfg cifar100/normkd/res56_res20 \
        SOLVER.TRAINER $trainer SOLVER.EPOCHS "$EPOCHS" SOLVER.LR_DECAY_STAGES "$STAGES" \
        DATASET.ROOT "$CIFAR" DATASET.NUM_WORKERS 6 DISTILLER.TEACHER_CKPT "$TEACHER" \
        EXPERIMENT.SEED 0 EXPERIMENT.NAME "normkd,res56,res20,$trainer" LOG.PREFIX /tmp/parity \
        > "$RES/parity-$trainer.log" 2>&1 &
    done
    wait
    # Both parity runs share the GPU (they are launch-bound); their accuracy, not their speed, is compared.
    for trainer in base fast; do
      run=$(ls -d /tmp/parity/cifar100/normkd,res56,res20,$trainer,* | head -1)
      cp "$run/worklog.txt" "$RES/parity-$trainer-worklog.txt"
      cp "$run/config.yaml" "$RES/parity-$trainer-config.yaml"
      tail -c 300 "$RES/parity-$trainer-worklog.txt"; echo
    done ;;
  fused)
    python3 benchmarks/pack_speed.py --data "$CIFAR" --pairs res56_res20 --precisions fp32,bf16 --sizes 1,21 \
      --layouts serial,fused --cudnn-benchmark off,on --iters 100 --out "$RES/pack_speed_fused.md" \
      --table "$RES/fuse_speed.csv" 2>&1 | tee "$RES/pack_speed_fused.log" | grep '^|' ;;
  pack)
    python3 benchmarks/pack_speed.py --data "$CIFAR" --out "$RES/pack_speed.md" --table "$RES/fuse_speed.csv" 2>&1 \
      | tee "$RES/pack_speed.log" | grep '^|' ;;
  ddp)
    work=/tmp/normkd-ddp && rm -rf "$work" && mkdir -p "$work"
    # shellcheck disable=SC2046
    for trainer in fast ddp; do
      timeout 240 torchrun --nproc-per-node 1 --standalone -m normkd_plugin.train --cfg cifar100/normkd/res56_res20 \
        SOLVER.TRAINER $trainer DATASET.ROOT "$CIFAR" DATASET.NUM_WORKERS 8 DISTILLER.TEACHER_CKPT "$TEACHER" \
        LOG.PREFIX "$work/runs" EXPERIMENT.NAME "nccl-$trainer" $(short) > "$RES/nccl_$trainer.log" 2>&1
      echo "one-rank NCCL epoch, SOLVER.TRAINER $trainer: exit $?" | tee -a "$RES/nccl_$trainer.log"
    done
    python3 benchmarks/imagenet_loader.py --images 4096 --batch-size 256 --workers 4,8,16 \
      --keep "$work/folder" --out "$RES/imagenet_loader.md" 2>&1 | tee "$RES/imagenet_loader.log" | tail -12
    # shellcheck disable=SC2046
    timeout 240 torchrun --nproc-per-node 1 --standalone -m normkd_plugin.train --cfg imagenet/r34_r18/kd \
      SOLVER.TRAINER ddp DISTILLER.TYPE NONE DATASET.DECODE gpu DATASET.ROOT "$work/folder" DATASET.NUM_WORKERS 8 \
      SOLVER.BATCH_SIZE 256 LOG.PREFIX "$work/runs" EXPERIMENT.NAME decode-gpu $(short) \
      > "$RES/decode_gpu_epoch.log" 2>&1
    echo "DATASET.DECODE gpu epoch: exit $?" | tee -a "$RES/decode_gpu_epoch.log"
    timeout 540 python3 benchmarks/imagenet_pack.py --device cuda --batch 64 --iters 10 --warmup 2 --workers 12 \
      --repeats 1 --decode host,gpu --out "$RES/imagenet_pack.md" 2>&1 | tee "$RES/imagenet_pack.log" | grep '^|'
    cat "$work"/runs/*/*/worklog.txt 2>/dev/null > "$RES/ddp_worklogs.txt" ;;
  compare)
    keep=${COMPARE_KEEP:-results/cifar100-res56_res20/runs} prefix=${COMPARE_PREFIX:-/tmp/compare}
    limit=${COMPARE_SECONDS:-480}
    [[ $limit =~ ^[0-9]+$ ]] || { echo "COMPARE_SECONDS=$limit: give whole seconds" | tee "$RES/compare.log"; bundle; exit 2; }
    read -r -a opts <<< "${COMPARE_OPTS:-}"  # word-split, never globbed: [150,180] stays as written
    mkdir -p "$prefix/cifar100" && rm -rf "$RES/runs"
    # SOLVER.FAST.FUSE auto decides from this machine's own measurement too (the fused stage's), if taken
    [ -f "$RES/fuse_speed.csv" ] && export NORMKD_FUSE_TABLE=$RES/fuse_speed.csv
    [ -d "$keep" ] && cp -rn "$keep"/. "$prefix/cifar100/"
    # The kill is only a backstop: --time-limit ends the chunk at an epoch boundary.
    timeout --signal=KILL $((limit + 60)) normkd-train --resume --time-limit "$limit" --seeds "${COMPARE_SEEDS:-0,1,2}" \
      --cfg cifar100/vanilla/res56_res20 --cfg cifar100/kd/res56_res20 --cfg cifar100/dkd/res56_res20 \
      --cfg cifar100/kd_ls/res56_res20 --cfg cifar100/dkd_ls/res56_res20 \
      --cfg cifar100/normkd/res56_res20 --cfg cifar100/normdkd/res56_res20 SOLVER.TRAINER fast DATASET.ROOT "$CIFAR" \
      DISTILLER.TEACHER_CKPT "$TEACHER" LOG.PREFIX "$prefix" "${opts[@]}" > "$RES/compare.log" 2>&1
    code=$?
    # Every run folder is crash-safe, so whatever the exit (a run that failed, the backstop kill), the
    # progress of the others comes back.
    for run in "$prefix"/cifar100/*/; do
      [ -f "$run"worklog.txt ] || continue
      dst="$RES/runs/$(basename "$run")" && mkdir -p "$dst"
      cp "$run"worklog.txt "$run"config.yaml "$dst"/
      cp "$run"provenance.yaml "$dst"/ 2>/dev/null
      # finished as the leaderboard and --resume mean it (normkd_plugin.worklog); else keep the compact resume state
      status=$(python3 -c 'import sys; from normkd_plugin.run_folder import RunFolder; print(RunFolder(sys.argv[1]).status())' "$run")
      [ "$status" = finished ] || cp "$run"latest "$dst"/ 2>/dev/null
      echo "$(basename "$run"): $(grep -c '^epoch:' "$run"worklog.txt) epochs" | tee -a "$RES/compare.log"
    done
    echo "compare chunk: exit $code (0: every run finished; 3: stopped at the time limit, run this stage again)" \
      | tee -a "$RES/compare.log"
    [ "$code" = 0 ] || [ "$code" = 3 ] || { grep -h "^normkd-train:" "$RES/compare.log"; bundle; exit 1; } ;;
  *) echo "unknown stage $step"; exit 2 ;;
  esac
  bundle
done
