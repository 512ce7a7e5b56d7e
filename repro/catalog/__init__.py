"""What the papers published, as data: released checkpoints, evaluation protocols, paper tables, measured costs."""
