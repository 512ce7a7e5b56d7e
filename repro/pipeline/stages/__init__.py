"""One module per DVC stage: run(cfg, paths, progress), and waves() / describe() where a stage has them."""
