"""One op per module: a Triton kernel beside its plain-PyTorch `*_ref` (same signature).

`kernels.ops` picks between them per call; see `kernels.dispatch`.
"""
