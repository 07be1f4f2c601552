"""Triton kernels of pyadapt, one file per fused op, installed as `pyadapt.kernels`.

Each file reads top to bottom: the `@triton.jit` forward kernel, the backward kernel(s), and one
small launcher per direction that checks shapes, picks block sizes and launches. The autograd
wiring and registration live in `pyadapt/ops/<op>.py`; the mathematics in `pyadapt.reference`.
Kernels run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (tests).
"""
