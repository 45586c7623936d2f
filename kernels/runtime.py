"""How the kernels meet Triton: interpreter or compiled, and the specialisations a launch produces.

One place for three things every kernel module needs and none of them should define twice:

* ``interpreting()``: whether ``@triton.jit`` kernels run under the Triton interpreter (``TRITON_INTERPRET=1``,
  CPU tensors) or are compiled for a GPU;
* the loop-bound fix for the interpreter under NumPy >= 2 (``enable_interpreter_loop_bounds``), applied when
  this module is imported under the interpreter, so kernels may use runtime values as ``range`` bounds;
* ``CompileSpec`` / ``Variant``: a kernel module's declaration of the launch configurations it can pick and of
  the argument specialisations real launches give them, which ``gradmem_fast.tools.compile_check`` compiles
  ahead of time for sm_90 (this module only declares them; it imports nothing from gradmem_fast).

Specialisation (what Triton's launcher does, ``triton.runtime.jit`` + ``BaseBackend.get_*_specialization``):
a pointer argument whose address is a multiple of 16 bytes and an integer argument whose value is a multiple
of 16 are compiled with ``tt.divisibility = 16``, which lets the compiler prove alignment and emit 16-byte
vector loads, ``cp.async`` and wgmma operand tiles; an integer argument equal to 1 becomes a compile-time
constant. Each distinct combination is its own binary with its own registers, so the compile check must
compile the combinations launches produce, not an unspecialised kernel nobody runs.
"""

import dataclasses
import os


def interpreting() -> bool:
    """True when Triton kernels run under the interpreter (CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def enable_interpreter_loop_bounds() -> None:
    """Let the Triton interpreter use tensor loop bounds (``range(lo, hi)``) under NumPy >= 2.

    The interpreter holds scalars as 1-element arrays and converts loop bounds with ``int(array)``, which
    NumPy 2 rejects for arrays of rank > 0; ``.item()`` accepts them. Only the interpreter is touched, only for
    the duration of each kernel call (its own patch scope restores the attribute), and only when it runs.
    Idempotent.
    """
    import triton.runtime.interpreter as interp

    original = interp._patch_lang_tensor
    if getattr(original, "_index_compat", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched._index_compat = True
    interp._patch_lang_tensor = patched


BF16_INTERPRETER_MESSAGE = (
    "bfloat16 on the triton backend needs a GPU: the Triton interpreter (CPU tensors) multiplies bf16 tiles as raw "
    "bit patterns, so its bf16 dot products are garbage; use backend='torch' (or float32/float16) on a CPU"
)


def refuse_interpreter_bf16_dots() -> None:
    """Make a bf16 ``tl.dot`` under the interpreter raise instead of returning garbage. Idempotent.

    The interpreter keeps bf16 tiles as uint16 bit patterns and its dot multiplies those integers (relative
    error ~1e9): a user who runs the triton backend on CPU tensors in bf16 must get an error, never a memory
    10^11 off. Other dtypes go to the interpreter's own dot. A replacement installed after this one (the tests'
    exact bf16 emulation, tests/test_bf16_emulation.py) takes precedence for as long as it is installed.
    """
    import triton.language as tl
    import triton.runtime.interpreter as interp

    original = interp.InterpreterBuilder.create_dot
    if getattr(original, "_refuses_bf16", False):
        return

    def create_dot(self, a, b, *args, **kwargs):
        if tl.bfloat16 in (a.dtype.scalar, b.dtype.scalar):
            raise TypeError(BF16_INTERPRETER_MESSAGE)
        return original(self, a, b, *args, **kwargs)

    create_dot._refuses_bf16 = True
    interp.InterpreterBuilder.create_dot = create_dot


if interpreting():
    enable_interpreter_loop_bounds()
    refuse_interpreter_bf16_dots()


@dataclasses.dataclass(frozen=True)
class Variant:
    """One argument specialisation of a launch configuration.

    ``divisible``: names of the pointer / integer arguments that arrive 16-byte aligned / divisible by 16
    (compiled with ``tt.divisibility=16``); every other pointer or integer argument is compiled without the
    hint. ``ones``: integer arguments that arrive equal to 1 (compiled as the constant 1). ``constexprs``:
    constexpr values this variant overrides (e.g. an odd ``HEAD_DIM``). ``archs``: restricts the variant to
    some of the spec's architectures (e.g. the unaligned variant of a small kernel on sm_90 only).
    """

    label: str
    divisible: frozenset = frozenset()
    ones: frozenset = frozenset()
    constexprs: tuple = ()  # ((name, value), ...): hashable
    archs: tuple = ()  # compute capabilities to compile this variant for (empty: all of the spec's)

    def __post_init__(self):
        object.__setattr__(self, "divisible", frozenset(self.divisible))
        object.__setattr__(self, "ones", frozenset(self.ones))
        object.__setattr__(self, "constexprs", tuple(dict(self.constexprs).items()))


# No hint at all: what the compile check compiled before it knew about specialisation.
UNSPECIALISED = Variant("unspecialised")


def pointers_and_ints(signature: dict) -> frozenset:
    """Every pointer and integer argument of a ``CompileSpec.signature``."""
    return frozenset(n for n, t in signature.items() if t.startswith("*") or t[:1] in ("i", "u") and t != "u1")


@dataclasses.dataclass
class CompileSpec:
    """One launch configuration of one kernel, compiled once per ``Variant``.

    ``signature`` maps every non-constexpr argument to a Triton type string (``"*fp16"``, ``"i32"``,
    ``"fp32"``); ``constexprs`` gives every constexpr argument's value; ``variants`` the specialisations a
    launch of this configuration can get (the compile check compiles each).
    """

    name: str
    kernel: object
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    archs: tuple = (90, 80)
    variants: tuple = (UNSPECIALISED,)
