"""Evaluation: the metric (Frechet distance in an extractor's features), reference statistics, tables."""
