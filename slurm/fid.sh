#!/usr/bin/env bash
# The fid and table stages of a preset as a SLURM job: the metric of every model on its sample shards, then
# results/<preset>/metrics.json and the tables.
#
#   sbatch slurm/fid.sh --preset cifar10-cond
#   sbatch --dependency=afterok:<sample job> slurm/fid.sh --preset cifar10-cond
#
# Log: <job-name>-<job-id>.log in the submit directory.
#SBATCH --job-name=repro-fid
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --mem=8G
#SBATCH --time=02:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.log
cd "${REPRO_ROOT:-${SLURM_SUBMIT_DIR:-.}}"
source slurm/common.sh
run_repro fid --no-progress
srun --ntasks=1 "${WRAP[@]}" repro table "${CONFIG[@]}"
