"""WriteConfig: every knob of a GradMem WRITE in one dataclass (DESIGN.md, "The semantics contract")."""

import dataclasses
import math

OPTIMIZERS = ("sgd", "adam")
GRAD_MODES = ("none", "first", "second")

# Adam clamps the raw gradient to +-clip_value; with no clip_value set it uses this (DESIGN.md item 4).
ADAM_DEFAULT_CLIP_VALUE = 10.0


@dataclasses.dataclass(frozen=True)
class WriteConfig:
    """How a batch of documents is written into memory.

    Attributes:
        num_memory_tokens: m, memory vectors per document (each of the model's hidden size).
        steps: K, gradient steps on the memory (>= 1).
        lr: step size of the inner optimizer (>= 0).
        optimizer: "sgd" or "adam" (Adam is first-order only).
        clip_value: clamp every gradient entry to +-clip_value (None: off for SGD, 10 for Adam).
        clip_norm: per-document L2 norm clip, ``g_b * clip_norm / (||g_b|| + 1e-6)`` where
            ``||g_b|| > clip_norm`` (None: off). Applied after ``clip_value``; with Adam, to the gradient
            before the moment updates (a gradmem-fast decision: the published Adam variant has no norm clip).
        grad_mode: "none" (memory detached after every step), "first" (update on the graph, gradient a
            constant), "second" (graph of the gradient for the last ``last_k_second_order`` steps).
        last_k_second_order: with grad_mode="second", how many of the last steps build the graph of the
            gradient (None: all K).
        adam_betas: Adam's (beta1, beta2).
        init_std: standard deviation of the N(0, init_std^2) initial memory drawn when none is given.
        seed: seed of the generator for that initial memory (drawn on the CPU, so it is device-independent).
    """

    num_memory_tokens: int = 8
    steps: int = 5
    lr: float = 1e-2
    optimizer: str = "sgd"
    clip_value: float | None = None
    clip_norm: float | None = None
    grad_mode: str = "none"
    last_k_second_order: int | None = None
    adam_betas: tuple[float, float] = (0.9, 0.999)
    init_std: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("num_memory_tokens", self.num_memory_tokens, minimum=1)
        _check_int("steps", self.steps, minimum=1)
        _check_number("lr", self.lr, minimum=0.0)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.clip_value is not None:
            _check_number("clip_value", self.clip_value, minimum=0.0, strict=True)
        if self.clip_norm is not None:
            _check_number("clip_norm", self.clip_norm, minimum=0.0, strict=True)
        if self.grad_mode not in GRAD_MODES:
            raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {self.grad_mode!r}")
        if self.last_k_second_order is not None:
            _check_int("last_k_second_order", self.last_k_second_order, minimum=0)
            if self.grad_mode != "second":
                raise ValueError("last_k_second_order is only meaningful with grad_mode='second'")
        if self.optimizer == "adam" and self.grad_mode == "second":
            raise ValueError(
                "grad_mode='second' is not supported with optimizer='adam' (Adam is first-order only); "
                "use optimizer='sgd' or grad_mode='first'"
            )
        betas = tuple(self.adam_betas)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        _check_number("init_std", self.init_std, minimum=0.0)
        _check_int("seed", self.seed, minimum=None)

    @property
    def effective_clip_value(self) -> float | None:
        """The clamp actually applied: ``clip_value``, or 10 for Adam when unset."""
        if self.clip_value is None and self.optimizer == "adam":
            return ADAM_DEFAULT_CLIP_VALUE
        return self.clip_value

    def second_order_step(self, k: int) -> bool:
        """Whether step ``k`` (0-based) builds the graph of its gradient."""
        if self.grad_mode != "second":
            return False
        last = self.steps if self.last_k_second_order is None else self.last_k_second_order
        return k >= self.steps - last


def _check_int(name: str, value: object, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_number(name: str, value: object, minimum: float, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")
