"""Files on disk: atomic writes, every on-disk name, downloads, the restricted unpickler."""
