#!/bin/sh
# Evaluate a trained model, as the release's tool/test.sh (POSIX sh: sh, bash, dash, or ./tool/test.sh):
#
#   sh tool/test.sh DATASET EXP [KEY VALUE ...]
#   e.g. sh tool/test.sh ade20k pyconvresnet50_pyconvsegnet scales "[0.5,0.75,1.0,1.25,1.5,1.75]"
#
# Uses config/DATASET/DATASET_EXP.yaml with the KEY VALUE overrides. Without model_path it evaluates
# the run that tool/train.sh made with the same overrides (save_path, epochs: its last checkpoint,
# and its best_mIoU.pth when there is one) and writes predictions, metrics.json and the log
# test-STAMP.log beside the run (RUN/result/epoch_N/SPLIT/ss). Runs from any directory; paths you
# give mean what they mean in your shell. PYTHON selects the interpreter (default: python).
set -eu

usage() {
  echo "usage: [PYTHON=python] sh tool/test.sh DATASET EXP [KEY VALUE ...]" >&2
  echo "  runs tool/test.py with config/DATASET/DATASET_EXP.yaml, e.g. sh tool/test.sh ade20k pyconvresnet50_pyconvsegnet" >&2
}

if [ "$#" -lt 2 ]; then
  usage
  exit 2
fi
case "$1" in -h|--help) usage; exit 0 ;; esac

dataset=$1
exp_name=$2
shift 2

PYTHON=${PYTHON:-python}
repo_dir=$(cd "$(dirname "$0")/.." && pwd)
config=${repo_dir}/config/${dataset}/${dataset}_${exp_name}.yaml

if [ ! -f "${config}" ]; then
  echo "config not found: ${config}" >&2
  usage
  exit 2
fi

# shellcheck disable=SC2086  # PYTHON may carry interpreter flags
exec ${PYTHON} -u "${repo_dir}/tool/test.py" --config "${config}" "$@"
