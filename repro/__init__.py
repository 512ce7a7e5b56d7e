"""repro: discriminator-based refinement of pretrained image generators (DDO, DG, ...), reproduced."""

__version__ = "0.1.0"
