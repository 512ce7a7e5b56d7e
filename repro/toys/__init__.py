"""Toys with exact answers (Gaussian mixtures) for the methods' tests."""
