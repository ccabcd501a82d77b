"""Triton kernels for Tapestry, one module per op family, plain functions on tensors (no policy).

Each public function is named after the op it implements (see ``tapestry.ops.OPS``). They run on
CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``.
"""
