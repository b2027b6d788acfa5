#!/usr/bin/env bash
# Train with config/DATASET/DATASET_EXP.yaml; checkpoints, the config and the log go to exp/DATASET/EXP/.
#
#   sh tool/train.sh camvid pyconvresnet50_pyconvsegnet [KEY VALUE ...]
#   NPROC=2 bash tool/train.sh camvid pyconvresnet50_pyconvsegnet    # torchrun with 2 processes
#   PYTHON=/path/to/python bash tool/train.sh ...                    # another interpreter
#
# Run from the repository root (config/ and exp/ are relative to it).
set -euo pipefail

usage() {
  echo "usage: [NPROC=N] [PYTHON=python] bash tool/train.sh DATASET EXP [KEY VALUE ...]" >&2
  echo "  e.g. bash tool/train.sh camvid pyconvresnet50_pyconvsegnet epochs 10" >&2
  echo "  reads config/DATASET/DATASET_EXP.yaml, writes exp/DATASET/EXP/{model,result} and a log in exp/DATASET/EXP/model" >&2
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
NPROC=${NPROC:-}
tool_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
config=config/${dataset}/${dataset}_${exp_name}.yaml
exp_dir=exp/${dataset}/${exp_name}
model_dir=${exp_dir}/model
result_dir=${exp_dir}/result

if [ ! -f "${config}" ]; then
  echo "config not found: ${config} (run from the repository root)" >&2
  usage
  exit 2
fi

mkdir -p "${model_dir}" "${result_dir}"
cp "${config}" "${exp_dir}/"
log=${model_dir}/train-$(date +%Y%m%d_%H%M%S).log

if [ -n "${NPROC}" ]; then
  launcher=(${PYTHON} -m torch.distributed.run --standalone --nproc_per_node="${NPROC}")
else
  launcher=(${PYTHON})
fi

echo "training ${config} -> ${model_dir} (log ${log})"
# pipefail: the script's status is train.py's, not tee's.
"${launcher[@]}" "${tool_dir}/train.py" --config "${config}" save_path "${model_dir}" "$@" 2>&1 | tee "${log}"
