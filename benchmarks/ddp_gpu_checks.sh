#!/usr/bin/env bash
# GPU checks of the torchrun/DDP trainer and the nvJPEG pipeline (one GPU is enough; about 5 minutes).
#   1. tests/test_imagenet.py on CUDA: nvJPEG + CUDA resampling against the CPU path
#   2. benchmarks/imagenet_loader.py: host PIL loader vs nvJPEG pipeline (table in $OUT)
#   3. a DATASET.DECODE gpu epoch of ResNet18 under torchrun (NCCL, one rank) on the generated folder
#   4. a CIFAR-100 epoch of SOLVER.TRAINER ddp under torchrun (NCCL, one rank) with the real teacher
# Needs DATA (CIFAR-100 shards + resnet56 teacher, default ../shared/data). Results in $OUT.
set -uo pipefail
OUT=${OUT:-results/gpu-ddp}
DATA=${DATA:-../shared/data}
WORK=${WORK:-/tmp/normkd-ddp}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 NORMKD_DATA="$DATA"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_imagenet.py 2>&1 | tail -3 | tee "$OUT/test_imagenet.txt"
rm -rf "$WORK/folder"
python3 benchmarks/imagenet_loader.py --images 4096 --batch-size 256 --workers 4,8,16 \
  --keep "$WORK/folder" --out "$OUT/imagenet_loader.md" 2>&1 | tail -12
rm -rf "$WORK/runs"
timeout 240 torchrun --nproc-per-node 1 --standalone -m normkd_plugin.train --cfg imagenet/r34_r18/kd \
  SOLVER.TRAINER ddp DISTILLER.TYPE NONE DATASET.DECODE gpu DATASET.ROOT "$WORK/folder" DATASET.NUM_WORKERS 8 \
  SOLVER.BATCH_SIZE 256 SOLVER.EPOCHS 1 LOG.PREFIX "$WORK/runs" EXPERIMENT.NAME decode-gpu EXPERIMENT.SEED 0 \
  > "$OUT/decode_gpu_epoch.log" 2>&1; echo "decode gpu epoch: exit $?" | tee -a "$OUT/decode_gpu_epoch.log"
timeout 240 torchrun --nproc-per-node 1 --standalone -m normkd_plugin.train --cfg cifar100/normkd/res56_res20 \
  SOLVER.TRAINER ddp SOLVER.EPOCHS 1 DATASET.ROOT "$DATA/cifar100" DATASET.NUM_WORKERS 8 \
  DISTILLER.TEACHER_CKPT "$DATA/teachers/cifar100/resnet56-f2eff4c8.pt" LOG.PREFIX "$WORK/runs" \
  EXPERIMENT.NAME cifar-ddp EXPERIMENT.SEED 0 > "$OUT/cifar_ddp_epoch.log" 2>&1
echo "cifar ddp epoch: exit $?" | tee -a "$OUT/cifar_ddp_epoch.log"
cat "$WORK"/runs/*/*/worklog.txt 2>/dev/null | tee "$OUT/worklogs.txt"
