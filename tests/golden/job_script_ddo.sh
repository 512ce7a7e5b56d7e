#!/bin/bash

# Parameters
#SBATCH --account=proj
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --gpus-per-node=8
#SBATCH --job-name=repro-micro-ddo
#SBATCH --mem=65536MB
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --open-mode=append
#SBATCH --output=<ROOT>/runs/slurm/%j/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --requeue
#SBATCH --signal=USR2@120
#SBATCH --time=1440
#SBATCH --wckey=submitit

# setup
export REPRO_IN_JOB=1
export OMP_WAIT_POLICY=PASSIVE
export REPRO_IMAGE_DIGEST=sha256:0123abcd
module load cuda/12.4

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output <ROOT>/runs/slurm/%j/%j_%t_log.out apptainer exec --nv --bind /data /images/repro.sif python -u -m submitit.core._submit <ROOT>/runs/slurm/%j
