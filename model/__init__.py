"""Causal InfoMamba: config, layers, the batched model, its stream state and weights on disk."""
