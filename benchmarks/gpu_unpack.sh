#!/usr/bin/env bash
# Unpack what benchmarks/gpu_checks.sh bundled on the GPU machine (results.tgz.00, .01, ...) into DEST.
# A compare chunk's runs/ replaces RUNS (default results/cifar100-res56_res20/runs): every run's
# worklog.txt, config.yaml and provenance.yaml, and `latest` only for the runs still unfinished. A fused-pack
# measurement (fuse_speed.csv) is merged into TABLE (default normkd_plugin/engine/fuse_speed.csv, the
# table SOLVER.FAST.FUSE auto reads), replacing the rows it measured again.
#   bash benchmarks/gpu_unpack.sh FOLDER_OF_THE_PARTS DEST [RUNS [TABLE]]
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 FOLDER_OF_THE_PARTS DEST [RUNS [TABLE]]" >&2; exit 2; }
parts=$1 dest=$2 runs=${3:-results/cifar100-res56_res20/runs} table=${4:-normkd_plugin/engine/fuse_speed.csv}
ls "$parts"/results.tgz.* > /dev/null || { echo "$0: no results.tgz.* parts in $parts" >&2; exit 2; }
mkdir -p "$dest"
cat "$parts"/results.tgz.* | tar -xzf - -C "$dest"
if [ -d "$dest/runs" ]; then
  rm -rf "$runs" && mkdir -p "$(dirname "$runs")" && mv "$dest/runs" "$runs"
  echo "$runs: $(find "$runs" -name worklog.txt | wc -l) runs, $(find "$runs" -name latest | wc -l) unfinished"
fi
if [ -f "$dest/fuse_speed.csv" ]; then
  python3 -m normkd_plugin.engine.fuse_speed "$dest/fuse_speed.csv" "$table"
fi
ls "$dest"
