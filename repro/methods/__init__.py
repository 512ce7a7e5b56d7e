"""The methods and their training loops: EDM pretraining, DDO (self-play rounds), shared training pieces."""
