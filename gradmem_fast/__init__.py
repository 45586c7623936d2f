"""gradmem-fast: a fast runtime for GradMem test-time gradient memory.

GradMem writes a document into ``m`` memory vectors by a few gradient-descent steps on those vectors
(the language model stays frozen) and later answers queries from the memory alone. See README.md.

Public names are imported lazily so that ``import gradmem_fast`` stays cheap and does not import
Triton (the Triton interpreter must be configured before Triton is first imported).
"""

import importlib
import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Running from a source checkout without installing: the kernels live in ../kernels and are installed
# as gradmem_fast.kernels by setup.py's package_dir. Adding the checkout root to this package's search
# path makes `gradmem_fast.kernels` resolve to that folder in place.
_here = os.path.dirname(os.path.abspath(__file__))
_source_kernels = os.path.join(os.path.dirname(_here), "kernels")
if not os.path.isdir(os.path.join(_here, "kernels")) and os.path.isfile(os.path.join(_source_kernels, "__init__.py")):
    __path__.append(os.path.dirname(_here))  # noqa: F821 (package __path__)

_EXPORTS = {
    "WriteConfig": "gradmem_fast.config",
    "StopRule": "gradmem_fast.config",
    "Schedule": "gradmem_fast.config",
    "DocumentStats": "gradmem_fast.result",
    "WriteResult": "gradmem_fast.result",
    "MemoryWriter": "gradmem_fast.writer",
    "resolve_backend": "gradmem_fast.backend",
    "prefix_attention": "gradmem_fast.ops.attention",
    "linear_cross_entropy": "gradmem_fast.ops.cross_entropy",
    "memory_update": "gradmem_fast.ops.update",
    "UpdateResult": "gradmem_fast.ops.update",
    "register_attention": "gradmem_fast.hf",
    "MemoryReader": "gradmem_fast.reader",
    "GradMemConfig": "gradmem_fast.model",
    "GradMemModel": "gradmem_fast.model",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:  # the type checker sees the real names (and their signatures); at run time they stay lazy
    from gradmem_fast.backend import resolve_backend as resolve_backend
    from gradmem_fast.config import Schedule as Schedule
    from gradmem_fast.config import StopRule as StopRule
    from gradmem_fast.config import WriteConfig as WriteConfig
    from gradmem_fast.hf import register_attention as register_attention
    from gradmem_fast.model import GradMemConfig as GradMemConfig
    from gradmem_fast.model import GradMemModel as GradMemModel
    from gradmem_fast.ops.attention import prefix_attention as prefix_attention
    from gradmem_fast.ops.cross_entropy import linear_cross_entropy as linear_cross_entropy
    from gradmem_fast.ops.update import UpdateResult as UpdateResult
    from gradmem_fast.ops.update import memory_update as memory_update
    from gradmem_fast.reader import MemoryReader as MemoryReader
    from gradmem_fast.result import DocumentStats as DocumentStats
    from gradmem_fast.result import WriteResult as WriteResult
    from gradmem_fast.writer import MemoryWriter as MemoryWriter


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gradmem_fast' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
