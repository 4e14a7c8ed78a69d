"""Shared test setup. TRITON_INTERPRET must be set before any kernel module imports triton."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if not torch.cuda.is_available():
    # The CPU tests run many tiny ops: one thread each is faster than two fighting over the cores (and the
    # servers the tests start as processes inherit it).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
