"""Data sets prepared for the pipeline: uint8 image arrays with a sha256 manifest."""
