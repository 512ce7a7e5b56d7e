#!/usr/bin/env bash
# One DDO round of a preset (and its MLE control round, if the preset has one) as a SLURM job:
#
#   sbatch slurm/ddo_round.sh --preset cifar10-cond --round 3
#   PRESET=cifar10-cond ROUND=3 sbatch slurm/ddo_round.sh
#   sbatch --gpus-per-node=8 --ntasks-per-node=8 --time=1-00:00:00 slurm/ddo_round.sh --preset imagenet64-s --round 1
#
# Submit from the project directory (the one with params.yaml); round R needs round R-1 finished (chain them with
# --dependency=afterok:<job>). The #SBATCH lines are defaults: anything on the sbatch command line wins. GPUs:
# add --gpus-per-node=N --ntasks-per-node=N (one task per GPU). Preemption: the job is warned 120 s before its
# time limit (USR1) and on requeue (TERM); the round saves its state at the next step and requeues itself, and
# the requeued job resumes from there. Log: <job-name>-<job-id>.log in the submit directory.
#SBATCH --job-name=repro-ddo-round
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
[ -n "$ROUND" ] || { echo "error: no round: pass --round R (or ROUND=R)" >&2; exit 2; }
run_repro ddo --round "$ROUND" --no-progress
