#!/bin/sh
# Evaluate on a SLURM cluster: one srun task per GPU, each running tool/test.sh (same config, outputs
# and log as test.sh); the images are split across the tasks and the confusion matrices summed, so
# the scores equal a single-process run's. Same arguments and environment as tool/slurm_train.sh:
#
#   sh tool/slurm_test.sh PARTITION JOB_NAME DATASET EXP [KEY VALUE ...]
#   GPUS=8 sh tool/slurm_test.sh gpu test50 ade20k pyconvresnet50_pyconvsegnet scales "[0.5,0.75,1.0,1.25,1.5,1.75]"
SLURM_TASK_SCRIPT=test.sh exec sh "$(dirname "$0")/slurm_train.sh" "$@"
