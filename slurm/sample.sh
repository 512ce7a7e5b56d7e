#!/usr/bin/env bash
# The sample stage of a preset as a SLURM job: every model's evaluation images, in shards of seeds.
#
#   sbatch slurm/sample.sh --preset cifar10-cond
#   sbatch --gpus-per-node=8 --ntasks-per-node=8 slurm/sample.sh --preset imagenet64-s   # shards split over 8 ranks
#
# Finished shards are kept, so a requeued or resubmitted job continues where it stopped. (`dvc repro` with
# launcher.executor: slurm sends the shards out as a job array instead.) Log: <job-name>-<job-id>.log.
#SBATCH --job-name=repro-sample
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --mem=8G
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.log
cd "${REPRO_ROOT:-${SLURM_SUBMIT_DIR:-.}}"
source slurm/common.sh
run_repro sample --no-progress
