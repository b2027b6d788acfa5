#!/bin/sh
# Train with config/DATASET/DATASET_EXP.yaml (POSIX sh: sh, bash, dash, or ./tool/train.sh all work).
#
#   sh tool/train.sh camvid pyconvresnet50_pyconvsegnet [KEY VALUE ...]
#   NPROC=2 sh tool/train.sh camvid pyconvresnet50_pyconvsegnet    # torchrun with 2 processes
#   PYTHON=/path/to/python sh tool/train.sh ...                    # another interpreter
#
# Runs from any directory. The config's own relative paths are the repository's (data/..., exp/...);
# paths you give as KEY VALUE mean what they mean in your shell (relative to your directory).
# tool/train.py writes checkpoints, the log train-STAMP.log and the effective config train-STAMP.yaml
# to save_path (the config's exp/DATASET/EXP/model unless you override it), once the config is valid.
set -eu

usage() {
  echo "usage: [NPROC=N] [PYTHON=python] sh tool/train.sh DATASET EXP [KEY VALUE ...]" >&2
  echo "  e.g. sh tool/train.sh camvid pyconvresnet50_pyconvsegnet epochs 10 save_path runs/camvid1/model" >&2
  echo "  reads config/DATASET/DATASET_EXP.yaml; checkpoints, log and effective config go to save_path" >&2
}

. "$(dirname "$0")/wrapper_common.sh"
find_config "$@"
shift 2
NPROC=${NPROC:-}

# shellcheck disable=SC2086  # PYTHON may carry interpreter flags
if [ -n "${NPROC}" ]; then
  exec ${PYTHON} -m torch.distributed.run --standalone --nproc_per_node="${NPROC}" \
    "${repo_dir}/tool/train.py" --config "${config}" "$@"
fi
exec ${PYTHON} "${repo_dir}/tool/train.py" --config "${config}" "$@"
