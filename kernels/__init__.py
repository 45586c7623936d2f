"""Pure Triton kernels of gradmem-fast (installed as ``gradmem_fast.kernels``).

Each module holds ``@triton.jit`` kernels and thin launch helpers that take tensors and return tensors.
Nothing here knows about autograd or Hugging Face; the differentiable ops are in ``gradmem_fast.ops``.
Nothing here imports gradmem_fast either: interpreter detection, the interpreter's loop-bound fix and the
declarations of launch specialisations live in ``runtime.py``. A module that wants its launch configurations
checked by ``python -m gradmem_fast.tools.compile_check`` exposes ``compile_specs()`` returning a list of
``runtime.CompileSpec`` (one per configuration, with the ``runtime.Variant`` specialisations launches give it).
"""
