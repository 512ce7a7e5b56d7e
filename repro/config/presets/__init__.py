"""Named settings (YAML): tiny is the embedded default, micro the end-to-end test, the rest paper rows."""
