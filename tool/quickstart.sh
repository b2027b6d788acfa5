#!/usr/bin/env bash
# The first command of the README: install, make the demo dataset, train, evaluate. No GPU, no download
# of data or weights (pip may download the requirements).
#
#   bash tool/quickstart.sh
#
#   SKIP_INSTALL=1 bash tool/quickstart.sh     # requirements already installed: skip pip
#   PYTHON=/path/to/python bash tool/quickstart.sh
#   (to change the training, run tool/train.sh and tool/test.sh yourself with KEY VALUE overrides)
#
# Steps (each is a command you can also run by hand, from the repository root):
#   1. python -m pip install -r requirements.txt
#   2. python tool/dataset_converters/make_demo_data.py data/demo    (skipped when data/demo exists)
#   3. python tool/dataset_converters/prepare_ade20k.py data/demo/ADEChallengeData2016
#   4. ./tool/train.sh demo pyconvresnet50_pyconvsegnet overwrite_run True
#                                                              -> exp/demo/pyconvresnet50_pyconvsegnet/model
#      (overwrite_run True: a second quickstart replaces the first one's run instead of stopping at it)
#   5. ./tool/test.sh demo pyconvresnet50_pyconvsegnet         -> .../result/epoch_4/val/ss/{color,gray,metrics.json}
set -euo pipefail

if [ "$#" -gt 0 ]; then
  echo "usage: [SKIP_INSTALL=1] [PYTHON=python] bash tool/quickstart.sh   (no arguments)" >&2
  exit 2
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# The active environment's python (a venv's), else python3 where only that name exists.
PYTHON=${PYTHON:-$(command -v python || command -v python3 || echo python)}
export PYTHON
dataset=demo
exp_name=pyconvresnet50_pyconvsegnet
data_dir=data/demo
start=$(date +%s)

step() { printf '\n==> %s\n' "$*"; }

if [ "${SKIP_INSTALL:-0}" != "1" ]; then
  step "installing the requirements (pip install -r requirements.txt)"
  "$PYTHON" -m pip install -r requirements.txt
fi

# The generator writes the validation split last: its last label means a complete dataset.
if [ -f "${data_dir}/ADEChallengeData2016/annotations/validation/ADE_val_00000024.png" ]; then
  step "demo dataset: ${data_dir} exists, keeping it"
else
  step "generating the demo dataset in ${data_dir} (ADE20K's raw layout)"
  "$PYTHON" tool/dataset_converters/make_demo_data.py "${data_dir}"
fi

step "preparing it as ADE20K is prepared (0-based labels, lists)"
"$PYTHON" tool/dataset_converters/prepare_ade20k.py "${data_dir}/ADEChallengeData2016"

step "training PyConvSegNet (PyConvResNet-50) from scratch: config/${dataset}/${dataset}_${exp_name}.yaml"
sh tool/train.sh "${dataset}" "${exp_name}" overwrite_run True

step "evaluating on the validation images"
sh tool/test.sh "${dataset}" "${exp_name}"

# Where train.sh and test.sh wrote their outputs: the run's last checkpoint and its results (util/runtime/runs.py).
read -r model_path save_folder < <("$PYTHON" -c "import sys; sys.path.insert(0, '.'); \
from util.config import load_cfg; from util.runtime.runs import resolve_test_paths; \
cfg = load_cfg('config/${dataset}/${dataset}_${exp_name}.yaml'); resolve_test_paths(cfg); \
print(cfg.model_path, cfg.save_folder)")
elapsed=$(( $(date +%s) - start ))
step "done in $((elapsed / 60))m$(printf '%02d' $((elapsed % 60)))s"
echo "  checkpoint:          ${model_path}"
echo "  colour predictions:  ${save_folder}/color/"
echo "  class-id maps:       ${save_folder}/gray/"
echo "  metrics:             ${save_folder}/metrics.json"
