"""Where work runs: the launcher (here or SLURM jobs), torch.distributed, preemption."""
