#!/usr/bin/env bash
# Evaluate a trained model, as the release's tool/test.sh:
#
#   sh tool/test.sh DATASET EXP [KEY VALUE ...]
#   e.g. sh tool/test.sh ade20k pyconvresnet50_pyconvsegnet scales "[0.5,0.75,1.0,1.25,1.5,1.75]"
#
# Uses config/DATASET/DATASET_EXP.yaml, copies it into exp/DATASET/EXP/ and logs to
# exp/DATASET/EXP/result/test-DATE.log. Extra KEY VALUE pairs override config keys.
# PYTHON selects the interpreter (default: python); run from anywhere (paths are the repo's).
set -euo pipefail

usage() {
  echo "usage: $0 DATASET EXP [KEY VALUE ...]" >&2
  echo "  runs tool/test.py with config/DATASET/DATASET_EXP.yaml, e.g. $0 ade20k pyconvresnet50_pyconvsegnet" >&2
}

if [ "$#" -lt 2 ]; then
  usage
  exit 2
fi

dataset=$1
exp_name=$2
shift 2

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
exp_dir="exp/${dataset}/${exp_name}"
result_dir="${exp_dir}/result"
config="config/${dataset}/${dataset}_${exp_name}.yaml"

if [ ! -f "$config" ]; then
  echo "config not found: $config" >&2
  usage
  exit 2
fi

now=$(date +"%Y%m%d_%H%M%S")
mkdir -p "$result_dir"
cp "$config" "$exp_dir/"

# shellcheck disable=SC2086  # PYTHON may carry interpreter flags
$PYTHON -u tool/test.py --config "$config" "$@" 2>&1 | tee "${result_dir}/test-${now}.log"
