"""Kernel tests run the Triton kernels on CUDA, or on CPU through the Triton interpreter.

TRITON_INTERPRET must be set before triton is imported (`@triton.jit` picks the interpreter when the
kernel module is imported), so it is set here, at collection time, ahead of the test modules.
ULTRAMEM_POISON_OUTPUTS makes every kernel output start as NaN (-1 for integers) so that an element
a kernel forgot to write fails the comparisons instead of passing on leftover memory.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("ULTRAMEM_POISON_OUTPUTS", "1")
