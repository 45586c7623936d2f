"""WriteConfig: every knob of a GradMem WRITE in one dataclass (DESIGN.md, "The semantics contract").

Many-step writing ("cramming") adds two knobs: ``Schedule`` (the step size over a document's own steps) and
``StopRule`` (when a document counts as learned, so its writing stops and, in ``write_many``, a waiting
document takes its slot; see ``gradmem_fast.cramming``).
"""

import dataclasses
import math

OPTIMIZERS = ("sgd", "adam", "adamw")
ADAM_OPTIMIZERS = ("adam", "adamw")  # moments, bias correction, first-order only
INITS = ("normal", "uniform", "embedding-diag", "embedding-full", "pca")  # gradmem_fast.init draws them
GRAD_MODES = ("none", "first", "second")
MEMORY_BASES = ("pca", "learned")  # low-rank memories (gradmem_fast.lowrank)

SCHEDULES = ("constant", "cosine", "linear")

# Adam clamps the raw gradient to +-clip_value; with no clip_value set it uses this (DESIGN.md item 4).
ADAM_DEFAULT_CLIP_VALUE = 10.0


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Step size of step k (0-based) of a document written with at most ``total`` steps: ``lr * factor(k, total)``.

        warmup:   factor = (k + 1) / warmup                                  for k < warmup
        then      p = (k - warmup) / max(1, total - warmup)                  (0 at the first step after warmup)
        constant: factor = 1
        cosine:   factor = final + (1 - final) * (1 + cos(pi * p)) / 2
        linear:   factor = final + (1 - final) * (1 - p)

    Each document follows its own schedule from its own first step (in continuous batching, a document that
    enters a slot late starts at k = 0), over ``total`` = ``WriteConfig.steps``, whether or not it stops early.

    Attributes:
        kind: "constant", "cosine" or "linear".
        warmup: steps of linear warmup (0: none).
        final: the factor the decay approaches (reached one step after the last), as a fraction of lr; so
            the last step still moves the memory when final is 0.
    """

    kind: str = "constant"
    warmup: int = 0
    final: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule kind must be one of {SCHEDULES}, got {self.kind!r}")
        _check_int("warmup", self.warmup, minimum=0)
        _check_number("final", self.final, minimum=0.0)
        if self.final > 1.0:
            raise ValueError(f"final must be in [0, 1] (a fraction of lr), got {self.final}")

    def factor(self, k: int, total: int) -> float:
        """The factor of step ``k`` (0-based) of ``total`` steps (formula in the class docstring)."""
        if k < self.warmup:
            return (k + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        p = min(1.0, (k - self.warmup) / max(1, total - self.warmup))
        if self.kind == "cosine":
            return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * p))
        return self.final + (1.0 - self.final) * (1.0 - p)


def default_check_every(device: str) -> int:
    """The command line's default ``check_every`` on ``device``: 1 on a CPU, where a check's host read costs
    nothing (the check reuses the step's forward), so documents stop at their exact step; 10 on a GPU, where
    every host read drains the queue of launched work."""
    return 1 if str(device).startswith("cpu") else 10


@dataclasses.dataclass(frozen=True)
class StopRule:
    """When a document is learned: its writing stops and its memory is final.

    Checked in the forward pass of every c-th step of a document (steps c, 2c, 3c, ...; c =
    min(check_every, WriteConfig.steps + 1)), on the memory that step starts from: the memory of c - 1,
    2c - 1, ... updates. When the rule holds, that step's update is skipped and the memory is final, with
    ``steps`` = the updates it took. A document that reaches ``WriteConfig.steps`` updates without stopping
    is frozen and reported at its next check. A document stops as soon as any criterion that is set holds:

        loss:     L_b <= loss                       mean reconstruction loss (nats per token)
        accuracy: a_b >= accuracy                   a_b = #{j : argmax logit_j == c_j} / n_b (teacher forcing)
        exact:    a_b == 1                          greedy decoding from the memory reproduces the document

    ``exact`` is checked with teacher forcing in one batched forward: when every position's argmax is the true
    token, greedy decoding from the memory alone emits exactly the document (by induction: each greedy token
    is the true one, so the next step sees the true prefix), and conversely. Teacher-forced accuracy below 1
    says little about decoding (one early error derails the rest), which is why ``exact`` is the default.

    A check reuses the step's own forward (scoring its logits on the torch backend; one extra head product
    on the engine, whose fused cross-entropy keeps no logits) and costs one small host read, so
    ``check_every`` trades wasted steps (a document may run up to check_every - 1 steps past the point it
    was learned) against host reads, which stall a GPU's queue but cost nothing on a CPU (check_every=1
    is the right choice there).
    """

    loss: float | None = None
    accuracy: float | None = None
    exact: bool = True
    check_every: int = 10

    def __post_init__(self) -> None:
        if self.loss is not None:
            _check_number("loss", self.loss, minimum=0.0)
        if self.accuracy is not None:
            _check_number("accuracy", self.accuracy, minimum=0.0, strict=True)
            if self.accuracy > 1.0:
                raise ValueError(f"accuracy must be in (0, 1], got {self.accuracy}")
        if not isinstance(self.exact, bool):
            raise TypeError(f"exact must be a bool, got {type(self.exact).__name__}")
        _check_int("check_every", self.check_every, minimum=1)
        if self.loss is None and self.accuracy is None and not self.exact:
            raise ValueError("a StopRule needs a criterion: set loss, accuracy or exact=True")


@dataclasses.dataclass(frozen=True)
class WriteConfig:
    """How a batch of documents is written into memory.

    Attributes:
        num_memory_tokens: m, memory vectors per document (each of the model's hidden size).
        steps: K, gradient steps on the memory (>= 1).
        lr: step size of the inner optimizer (>= 0).
        optimizer: "sgd", "adam" or "adamw" (Adam with decoupled weight decay; both first-order only).
        clip_value: clamp every gradient entry to +-clip_value (None: off for SGD, 10 for Adam).
        clip_norm: per-document L2 norm clip, ``g_b * clip_norm / (||g_b|| + 1e-6)`` where
            ``||g_b|| > clip_norm`` (None: off). Applied after ``clip_value``; with Adam, to the gradient
            before the moment updates (a gradmem-fast decision: the published Adam variant has no norm clip).
        grad_mode: "none" (memory detached after every step), "first" (update on the graph, gradient a
            constant), "second" (graph of the gradient for the last ``last_k_second_order`` steps).
        last_k_second_order: with grad_mode="second", how many of the last steps build the graph of the
            gradient (None: all K).
        adam_betas: Adam's (beta1, beta2).
        weight_decay: AdamW's decoupled weight decay wd (>= 0; needs optimizer="adamw"): each step first
            scales a document's memory by (1 - lr_k wd), then takes the Adam step, as torch.optim.AdamW
            does. 0 (default) makes AdamW plain Adam.
        init_std: standard deviation of the N(0, init_std^2) initial memory drawn when none is given (and of
            the uniform one).
        seed: seed of the generator for that initial memory (drawn on the CPU, so it is device-independent).
        init: how that initial memory is drawn: "normal" (N(0, init_std^2)), "uniform" (same variance),
            "embedding-diag" / "embedding-full" (a normal fitted to the input embedding matrix per coordinate
            / with full covariance), "pca" (its top ``init_rank`` principal directions); formulas in
            ``gradmem_fast.init``.
        init_rank: with init="pca", the number of principal directions (None: min(hidden size, 16)).
        schedule: the step size over each document's steps (``Schedule``; None: constant lr).
        stop: ``StopRule`` for many-step writing: a document stops when it is learned (then ``steps`` is the
            most steps any document gets). Needs grad_mode "none" (stopping is a decision, not a function
            that meta-training could differentiate).
        given_tokens: g, leading tokens of every document that are read but not predicted. The loss, its
            per-document mean and every score (stopping rules, exact decode, accuracy, information gain) cover
            tokens g..n-1 only: with g = 1, position m-1 predicts nothing and token 0 is an input, the
            convention of the cramming papers (their text starts with BOS, which the memory precedes). A
            document with n <= g has no scored token (loss 0, zero gradient). 0: the GradMem contract, where
            the memory predicts token 0.
        memory_rank: k, write every memory in a rank-k affine subspace, M_b = mu + z_b U^T with z_b [m, k] per
            document and U [d, k] (``gradmem_fast.lowrank``); the update acts on z (None: full memories).
            Needs grad_mode="none"; k <= the model's hidden size (checked when the write starts).
        memory_basis: with memory_rank, "pca" (U, mu: the top-k principal directions and the mean of the input
            embeddings, fixed) or "learned" (starts there; U and mu shared by the documents in flight, trained
            by Adam on the batch's summed gradient).
        basis_lr: step size of the learned basis's Adam (None: lr); needs memory_basis="learned".
        alignment_weight: alpha of the activation-alignment term (the "hybrid" loss of progressive_cramming,
            ``gradmem_fast.alignment``): each step differentiates L_b + alpha A_b, A_b the mean cosine
            distance between the memory run's and the memory-free text run's hidden states at the last
            ``alignment_layers`` layers over the scored tokens. The reported loss, stop rules and scores stay
            the cross-entropy L_b. 0 (default): off. Needs backend="torch".
        alignment_layers: N, the last layers aligned (None: all of them); needs alignment_weight > 0.
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
    weight_decay: float = 0.0
    init_std: float = 0.02
    seed: int = 0
    init: str = "normal"
    init_rank: int | None = None
    schedule: Schedule | None = None
    stop: StopRule | None = None
    given_tokens: int = 0
    memory_rank: int | None = None
    memory_basis: str = "pca"
    basis_lr: float | None = None
    alignment_weight: float = 0.0
    alignment_layers: int | None = None

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
        _check_number("weight_decay", self.weight_decay, minimum=0.0)
        if self.weight_decay and self.optimizer != "adamw":
            raise ValueError(f"weight_decay needs optimizer='adamw' (decoupled decay), got {self.optimizer!r}")
        if self.optimizer in ADAM_OPTIMIZERS and self.grad_mode == "second":
            raise ValueError(
                f"grad_mode='second' is not supported with optimizer={self.optimizer!r} (Adam is first-order only); "
                "use optimizer='sgd' or grad_mode='first'"
            )
        betas = tuple(self.adam_betas)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        _check_number("init_std", self.init_std, minimum=0.0)
        _check_int("seed", self.seed, minimum=None)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.init_rank is not None:
            _check_int("init_rank", self.init_rank, minimum=1)
            if self.init != "pca":
                raise ValueError("init_rank is only meaningful with init='pca'")
        _check_int("given_tokens", self.given_tokens, minimum=0)
        if self.schedule is not None and not isinstance(self.schedule, Schedule):
            raise TypeError(f"schedule must be a Schedule or None, got {type(self.schedule).__name__}")
        if self.stop is not None:
            if not isinstance(self.stop, StopRule):
                raise TypeError(f"stop must be a StopRule or None, got {type(self.stop).__name__}")
            if self.grad_mode != "none":
                raise ValueError("stop: a StopRule needs grad_mode='none' (a stopped write is not differentiable)")
        self._check_low_rank()
        _check_number("alignment_weight", self.alignment_weight, minimum=0.0)
        if self.alignment_layers is not None:
            _check_int("alignment_layers", self.alignment_layers, minimum=1)
            if not self.alignment_weight:
                raise ValueError("alignment_layers is only meaningful with alignment_weight > 0")

    def _check_low_rank(self) -> None:
        if self.memory_basis not in MEMORY_BASES:
            raise ValueError(f"memory_basis must be one of {MEMORY_BASES}, got {self.memory_basis!r}")
        if self.basis_lr is not None:
            _check_number("basis_lr", self.basis_lr, minimum=0.0)
            if self.memory_basis != "learned":
                raise ValueError("basis_lr is only meaningful with memory_basis='learned'")
        if self.memory_rank is None:
            if self.memory_basis != "pca":
                raise ValueError("memory_basis needs memory_rank (the rank k of the low-rank memory)")
            return
        _check_int("memory_rank", self.memory_rank, minimum=1)
        if self.grad_mode != "none":
            raise ValueError("memory_rank: low-rank memories are written with grad_mode='none' (no meta-gradient)")

    def lr_at(self, k: int) -> float:
        """The step size of step ``k`` (0-based): ``lr * schedule.factor(k, steps)``."""
        return self.lr if self.schedule is None else self.lr * self.schedule.factor(k, self.steps)

    @property
    def scheduled(self) -> bool:
        """Whether the step size changes from step to step."""
        return self.schedule is not None and (self.schedule.kind != "constant" or self.schedule.warmup > 0)

    @property
    def effective_clip_value(self) -> float | None:
        """The clamp actually applied: ``clip_value``, or 10 for Adam when unset."""
        if self.clip_value is None and self.optimizer in ADAM_OPTIMIZERS:
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
