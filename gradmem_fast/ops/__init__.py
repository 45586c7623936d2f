"""Differentiable ops (autograd functions / torch.library ops) with backend dispatch.

One file per op; each op's math is in its docstring. Kernels come from ``gradmem_fast.kernels``; the
``torch`` backend of each op is plain differentiable torch code.
"""
