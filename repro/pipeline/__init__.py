"""The pipeline: DVC stages as commands (repro.pipeline.run), one module per stage (repro.pipeline.stages)."""
