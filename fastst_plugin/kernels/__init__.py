"""Fused ops: one op per file, each with its Triton kernels, autograd wrapper and torch reference."""
