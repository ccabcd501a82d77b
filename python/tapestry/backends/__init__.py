"""Backends other than the reference: thin wrappers that hand checked tensors to native kernels.

Each module defines one function per op it implements, named as in :data:`tapestry.ops.OPS`,
plus ``unavailable()`` and ``rejects(op, device, args)``. Wrappers allocate outputs and pass raw pointers,
sizes and strides; they contain no policy.
"""
