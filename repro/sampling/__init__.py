"""Sampling: EDM's Heun sampler with one guidance hook, per-seed generation, sharded sampling."""
