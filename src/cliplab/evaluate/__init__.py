"""Evaluation: features, zero-shot classification, linear probes and their metrics."""
