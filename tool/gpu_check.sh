#!/usr/bin/env bash
# What no CPU can show, in one command for the first GPU machine: every CUDA-only and multi-GPU path,
# run on the GPUs that are visible. One line per check (ok / failed / skipped: why), a log per check,
# exit status 1 if any check failed. On a machine without CUDA it says so and exits 0.
#
#   bash tool/gpu_check.sh
#   GPU_CHECK_DIR=/tmp/gpu_check PYTHON=python3 bash tool/gpu_check.sh
#
# Checks: the test suite; two-epoch demo trainings in fp32, bf16 and fp16 (loss finite and falling);
# torchrun with 2 processes (DDP, SyncBatchNorm), then 'resume auto' for one more epoch; the spawn
# mode over train_gpu [0, 1]; tool/test.py on 1 and 2 processes (equal confusion matrices); the
# six-scale 2048x1536 memory check on CUDA (under 8 GiB); the benchmark on CUDA.
# The demo dataset is generated in data/demo when missing (as tool/quickstart.sh does).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-$(command -v python || command -v python3 || echo python)}
work=${GPU_CHECK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "${work}"
config=config/demo/demo_pyconvresnet50_pyconvsegnet.yaml
ade20k=config/ade20k/ade20k_pyconvresnet50_pyconvsegnet.yaml
failures=0

gpus=$("${PYTHON}" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
if [ "${gpus}" -eq 0 ]; then
  echo "gpu_check: no CUDA device visible to ${PYTHON} (torch.cuda.is_available() is False): every check skipped"
  exit 0
fi
echo "gpu_check: ${gpus} GPU(s): $("${PYTHON}" -c "import torch; print(', '.join(sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})))"); logs in ${work}"

report() {  # NAME STATUS [DETAIL]
  printf '%-44s %s\n' "$1" "$2${3:+ ($3)}"
}

check() {  # NAME COMMAND...: runs COMMAND with its output in WORK/NAME.log
  local name=$1 log="${work}/$1.log"
  shift
  if "$@" >"${log}" 2>&1; then
    report "${name}" ok
  else
    report "${name}" failed "log: ${log}"
    failures=$((failures + 1))
  fi
}

needs_gpus() {  # NAME COUNT: true when there are COUNT GPUs, else prints the skip line
  if [ "${gpus}" -lt "$2" ]; then
    report "$1" "skipped: needs $2 GPUs"
    return 1
  fi
}

# Train result lines of a log: both epochs' losses finite and the second below the first.
loss_falls() {  # LOG
  "${PYTHON}" - "$1" <<'EOF'
import math, re, sys
losses = [float(v) for v in re.findall(r"Train result at epoch \[\d+/\d+\]: loss (\S+)", open(sys.argv[1]).read())]
print("epoch losses:", losses)
sys.exit(0 if len(losses) >= 2 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] else 1)
EOF
}

train_and_check() {  # LOG KEY VALUE...: train the demo config, then check its losses
  local log=$1
  shift
  "${PYTHON}" tool/train.py --config "${config}" overwrite_run True "$@" >"${log}" 2>&1 && loss_falls "${log}" >>"${log}" 2>&1
}

demo_data() {
  if [ ! -f data/demo/ADEChallengeData2016/annotations/validation/ADE_val_00000024.png ]; then
    "${PYTHON}" tool/dataset_converters/make_demo_data.py data/demo || return 1
  fi
  "${PYTHON}" tool/dataset_converters/prepare_ade20k.py data/demo/ADEChallengeData2016
}

check "test suite" "${PYTHON}" -m pytest -q tests
check "demo data" demo_data

for precision in fp32 bf16 fp16; do
  name="train demo ${precision} 2 epochs, loss falls"
  if [ "${precision}" = bf16 ] && ! "${PYTHON}" -c "import sys, torch; sys.exit(not torch.cuda.is_bf16_supported(including_emulation=False))"; then
    report "${name}" "skipped: this GPU has no native bfloat16"
    continue
  fi
  check "${name}" train_and_check "${work}/train_${precision}.out" epochs 2 precision "${precision}" \
    save_path "${work}/${precision}/model"
done

torchrun_and_resume() {  # one epoch on 2 processes, then 'resume auto' for a second one
  local torchrun=("${PYTHON}" -m torch.distributed.run --standalone --nproc_per_node=2 tool/train.py --config "${config}")
  "${torchrun[@]}" epochs 1 sync_bn True save_path "${work}/ddp/model" overwrite_run True &&
    "${torchrun[@]}" epochs 2 sync_bn True resume auto save_path "${work}/ddp/model" | tee "${work}/ddp_resume.out" &&
    grep -q "resumed from" "${work}/ddp_resume.out" && test -f "${work}/ddp/model/train_epoch_2.pth"
}

test_one_and_two_processes() {  # MODEL: tool/test.py alone and on 2 processes, same confusion matrix
  "${PYTHON}" tool/test.py --config "${config}" model_path "$1" save_folder "${work}/test1" best_mIoU_model_path '' &&
    "${PYTHON}" -m torch.distributed.run --standalone --nproc_per_node=2 tool/test.py --config "${config}" \
      model_path "$1" save_folder "${work}/test2" best_mIoU_model_path '' &&
    "${PYTHON}" -c "import json, sys; a, b = (json.load(open(p))['confusion_matrix'] for p in sys.argv[1:]); \
print('same confusion matrix' if a == b else 'different confusion matrices'); sys.exit(a != b)" \
      "${work}/test1/metrics.json" "${work}/test2/metrics.json"
}

name="torchrun 2 processes (DDP, SyncBN) + resume"
if needs_gpus "${name}" 2; then
  check "${name}" torchrun_and_resume
fi

name="spawn mode over train_gpu [0, 1]"
if needs_gpus "${name}" 2; then
  port=$("${PYTHON}" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  check "${name}" "${PYTHON}" tool/train.py --config "${config}" epochs 1 train_gpu "[0, 1]" \
    dist_url "tcp://127.0.0.1:${port}" save_path "${work}/spawn/model" overwrite_run True
fi

name="test.py 1 and 2 processes, same confusion"
model="${work}/fp32/model/train_epoch_2.pth"
if needs_gpus "${name}" 2; then
  if [ -f "${model}" ]; then
    check "${name}" test_one_and_two_processes "${model}"
  else
    report "${name}" "skipped: the fp32 demo training left no ${model}"
  fi
fi

memory_under_limit() {
  "${PYTHON}" tool/analysis_tools/benchmark.py --config "${ade20k}" --device cuda --memory-check --skip-eval --skip-train \
    --skip-data --output "${work}/memory.json" pretrained '' || return 1
  "${PYTHON}" -c "import json, sys; c = json.load(open(sys.argv[1]))['memory_check']; print(c); \
sys.exit(not c.get('under_limit'))" "${work}/memory.json"
}
check "six-scale 2048x1536 memory under 8 GiB" memory_under_limit
check "benchmark on CUDA" "${PYTHON}" tool/analysis_tools/benchmark.py --config "${ade20k}" --device cuda \
  --output "${work}/benchmark.json" pretrained ''

if [ "${failures}" -gt 0 ]; then
  echo "gpu_check: ${failures} check(s) failed; logs in ${work}"
  exit 1
fi
echo "gpu_check: every check that could run passed"
