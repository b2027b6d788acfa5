# Sourced by tool/train.sh, tool/test.sh and tool/slurm_train.sh (POSIX sh): what they do before they start
# Python (or srun).
# Needs a usage() function and the script's arguments; sets repo_dir, PYTHON and config.
#
#   . "$(dirname "$0")/wrapper_common.sh"
#   find_config "$@"    # DATASET EXP -> config/DATASET/DATASET_EXP.yaml, or the usage and status 2

repo_dir=$(cd "$(dirname "$0")/.." && pwd)
# The active environment's python (a venv's), else python3 where only that name exists (stock Ubuntu).
PYTHON=${PYTHON:-$(command -v python || command -v python3 || echo python)}

find_config() {
  case "${1:-}" in -h|--help) usage; exit 0 ;; esac
  if [ "$#" -lt 2 ]; then
    usage
    exit 2
  fi
  config=${repo_dir}/config/$1/$1_$2.yaml
  if [ ! -f "${config}" ]; then
    echo "config not found: ${config}" >&2
    usage
    exit 2
  fi
}
