"""Helpers shared by the command-line commands (``cli``, ``capacity``): messages, versions, option checks.

A module of its own so that a command module can use them without importing ``cli`` (which imports every
command: that would be an import cycle).
"""

import sys

from .errors import UserError
from .models import check_device

PROG = "gradmem-fast"


def warn(command, message):
    """Print a warning line on stderr (the command goes on)."""
    print(f"{PROG} {command}: warning: {message}", file=sys.stderr, flush=True)


def note(command, message):
    """Print an informational line on stderr."""
    print(f"{PROG} {command}: {message}", file=sys.stderr, flush=True)


def versions() -> dict:
    """Versions of the libraries that shape the numbers, for the metadata of what a command writes."""
    import safetensors
    import torch
    import transformers

    from . import __version__

    return {
        "gradmem_fast": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }


def positive_int(name, value, minimum=1):
    """Reject an integer option below ``minimum`` with a message naming the flag."""
    if value is None or value < minimum:
        raise UserError(f"{name} must be >= {minimum}, got {value}")


def device_and_dtype(args, local_rank=0):
    """The resolved device string, after ``--device`` and ``--dtype`` are checked (nothing loaded)."""
    from .models import resolve_device, resolve_dtype

    check_device(args.device)
    device = resolve_device(args.device, local_rank)
    resolve_dtype(args.dtype, device)
    return device


def add_init_arguments(p, warm: bool) -> None:
    """``--init`` and ``--init-rank`` (and, for ``write``, ``--init-from``)."""
    from .config import INITS

    choices = [*INITS, "warm"] if warm else list(INITS)
    p.add_argument(
        "--init",
        choices=choices,
        default="normal",
        help="initial memory: normal (N(0, --init-std^2), default), uniform (same variance), embedding-diag / "
        "embedding-full (a normal fitted to the input embeddings per coordinate / with full covariance), pca "
        "(their top --init-rank principal directions)"
        + (", warm (each document from its memory in --init-from)" if warm else ""),
    )
    p.add_argument("--init-rank", type=int, default=None, help="--init pca: principal directions (default 16)")
    add_lowrank_arguments(p)
    if warm:
        p.add_argument(
            "--init-from",
            default=None,
            help="--init warm: a previous write output (memory file or dataset folder) holding a memory for "
            "every document id",
        )


def add_lowrank_arguments(p) -> None:
    """``--memory-rank``, ``--memory-basis``, ``--basis-lr``: low-rank memories (``gradmem_fast.lowrank``)."""
    p.add_argument(
        "--memory-rank",
        type=int,
        default=None,
        help="write each memory as mu + z U^T with coefficients z of rank K per document (default: full memories)",
    )
    p.add_argument(
        "--memory-basis",
        choices=["pca", "learned"],
        default=None,
        help="--memory-rank: U, mu the top-K principal directions and the mean of the input embeddings (pca, "
        "default), or starting there and trained by Adam on the batch's summed gradient (learned)",
    )
    p.add_argument(
        "--basis-lr", type=float, default=None, help="--memory-basis learned: its Adam step size (default --lr)"
    )


def check_memory_rank(config, model_config) -> None:
    """``--memory-rank`` against the model's hidden size, read from its config before the weights load."""
    hidden = getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embd", None)
    if config.memory_rank is not None and hidden is not None and config.memory_rank > hidden:
        raise UserError(f"--memory-rank {config.memory_rank} exceeds the model's hidden size {hidden}")


def lowrank_options(args, learned: bool = True) -> dict:
    """The WriteConfig fields of the low-rank flags, bad values named by their flag (``learned=False``: a
    command that refuses a learned basis)."""
    rank = getattr(args, "memory_rank", None)
    basis = getattr(args, "memory_basis", None)
    basis_lr = getattr(args, "basis_lr", None)
    if rank is None:
        if basis is not None or basis_lr is not None:
            raise UserError("--memory-basis and --basis-lr need --memory-rank K")
        return {}
    positive_int("--memory-rank", rank)
    basis = basis or "pca"
    if basis_lr is not None:
        if basis != "learned":
            raise UserError("--basis-lr is for --memory-basis learned")
        if not 0 <= basis_lr < float("inf"):
            raise UserError(f"--basis-lr must be a finite number >= 0, got {basis_lr}")
    if basis == "learned" and not learned:
        raise UserError(
            "--memory-basis learned is not available here: the stages warm-start from earlier memories, which a "
            "restarted basis cannot hold (use --memory-basis pca)"
        )
    return {"memory_rank": rank, "memory_basis": basis, "basis_lr": basis_lr}


def check_weight_decay(args) -> None:
    """``--weight-decay``: a finite number >= 0, with ``--optimizer adamw`` only."""
    if not 0 <= args.weight_decay < float("inf"):
        raise UserError(f"--weight-decay must be a finite number >= 0, got {args.weight_decay}")
    if args.weight_decay and args.optimizer != "adamw":
        raise UserError(f"--weight-decay is decoupled decay for --optimizer adamw, not --optimizer {args.optimizer}")


def check_init_arguments(args) -> None:
    """``--init-rank`` only with ``--init pca``, and >= 1."""
    if args.init_rank is not None:
        if args.init != "pca":
            raise UserError(f"--init-rank is for --init pca, not --init {args.init}")
        positive_int("--init-rank", args.init_rank)


def add_alignment_arguments(p) -> None:
    """``--alignment-weight`` and ``--alignment-layers`` (the activation-alignment term, torch backend)."""
    p.add_argument(
        "--alignment-weight",
        type=float,
        default=0.0,
        help="alpha of the activation-alignment term (progressive_cramming's hybrid loss): each step also "
        "minimises alpha times the mean cosine distance between the hidden states with the memory and those of "
        "the text alone at the last --alignment-layers layers; losses, stop rules and scores stay the "
        "cross-entropy (default 0: off; needs --backend torch)",
    )
    p.add_argument(
        "--alignment-layers",
        type=int,
        default=None,
        help="--alignment-weight: the last N layers aligned (default: all)",
    )


def alignment_options(args) -> dict:
    """The WriteConfig fields of ``--alignment-weight``/``--alignment-layers``, bad values named by their flag."""
    if not 0 <= args.alignment_weight < float("inf"):
        raise UserError(f"--alignment-weight must be a finite number >= 0, got {args.alignment_weight}")
    if args.alignment_layers is not None:
        if not args.alignment_weight:
            raise UserError("--alignment-layers needs --alignment-weight > 0")
        positive_int("--alignment-layers", args.alignment_layers)
    if args.alignment_weight and getattr(args, "backend", "torch") == "triton":
        raise UserError("--alignment-weight needs --backend torch (the triton engine has no per-layer hidden states)")
    return {"alignment_weight": args.alignment_weight, "alignment_layers": args.alignment_layers}
