#!/bin/sh
# Train on a SLURM cluster: one srun task per GPU, each running tool/train.sh (same config, experiment
# layout and log as train.sh). tool/train.py learns its rank from srun's variables (the log's first
# line says "launcher: slurm") and meets the other tasks at the first node of the job step.
#
#   sh tool/slurm_train.sh PARTITION JOB_NAME DATASET EXP [KEY VALUE ...]
#   GPUS=16 sh tool/slurm_train.sh gpu psp50 ade20k pyconvresnet50_pyconvsegnet save_path /shared/exp/run1/model
#
# Environment: GPUS (total, default 8), GPUS_PER_NODE (default 8), CPUS_PER_TASK (default 5),
# SRUN_ARGS (more srun options, e.g. "--time=2-00:00:00 --qos=high"), PYTHON (interpreter).
# save_path must be a directory every node shares. A stop signal (SIGTERM on preemption, or SIGUSR1
# sent ahead with --signal) makes training save a mid-epoch checkpoint and exit with 128 + the
# signal's number; the same command with "resume auto" continues (docs/training.md, "Preemption":
# a job file that requeues itself). tool/slurm_test.sh runs this script with tool/test.sh as the task.
# DATASET EXP are checked here as train.sh checks them (tool/wrapper_common.sh): a config that does not
# exist is status 2 before srun runs; --help prints the usage with status 0.
set -eu

task=${SLURM_TASK_SCRIPT:-train.sh}  # set by tool/slurm_test.sh
usage() {
  echo "usage: [GPUS=8] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [SRUN_ARGS=...] sh tool/slurm_${task} PARTITION JOB_NAME DATASET EXP [KEY VALUE ...]" >&2
  echo "  runs 'sh tool/${task} DATASET EXP [KEY VALUE ...]' in GPUS srun tasks, GPUS_PER_NODE per node" >&2
}

. "$(dirname "$0")/wrapper_common.sh"
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
if [ "$#" -lt 4 ]; then
  usage
  exit 2
fi

partition=$1
job_name=$2
shift 2
find_config "$@"  # a mistyped DATASET or EXP stops here, before srun asks for an allocation
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-}
tasks_per_node=$(( GPUS < GPUS_PER_NODE ? GPUS : GPUS_PER_NODE ))
unset NPROC SLURM_TASK_SCRIPT  # srun starts the processes: train.sh must not start torchrun in each task

# shellcheck disable=SC2086  # SRUN_ARGS holds several options
exec srun -p "${partition}" --job-name="${job_name}" --gres=gpu:"${tasks_per_node}" --ntasks="${GPUS}" \
  --ntasks-per-node="${tasks_per_node}" --cpus-per-task="${CPUS_PER_TASK}" --kill-on-bad-exit=1 ${SRUN_ARGS} \
  sh "${repo_dir}/tool/${task}" "$@"
