"""Direct Discriminative Optimization (Zheng et al. 2025): the loss, one round, alpha/beta sweeps, self-play."""
