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
# give mean what they mean in your shell. PYTHON selects the interpreter (default: python, else python3).
set -eu

usage() {
  echo "usage: [PYTHON=python] sh tool/test.sh DATASET EXP [KEY VALUE ...]" >&2
  echo "  runs tool/test.py with config/DATASET/DATASET_EXP.yaml, e.g. sh tool/test.sh ade20k pyconvresnet50_pyconvsegnet" >&2
}

. "$(dirname "$0")/wrapper_common.sh"
find_config "$@"
shift 2

# shellcheck disable=SC2086  # PYTHON may carry interpreter flags
exec ${PYTHON} -u "${repo_dir}/tool/test.py" --config "${config}" "$@"
