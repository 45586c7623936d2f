"""The family matrix: every causal LM transformers ships, built tiny and random, checked against its own forward.

Our promise (DESIGN.md, semantics contract item 9): a Hugging Face causal LM is either computed exactly or
refused with a clear error before any work. ``check_family(model_type)`` measures that promise for one
``model_type`` of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``:

    oracle  per document, K SGD steps on M with the model's own eager forward:
            x = [M ; E(c)], logits = model(inputs_embeds=x, attention_mask=ones).logits (its own logit
            post-processing included),
            L = mean_j CE(logits[m-1+j], c_j), M <- M - lr dL/dM        (torch.autograd, one document at a time)
    torch   MemoryWriter(backend="torch"), the padded reference, on the batch of both documents
    triton  MemoryWriter(backend="triton"), the packed engine (kernels in the interpreter on a CPU)
    dropin  attn_implementation="gradmem_fast" against "eager": logits and d/d inputs_embeds on a
            right-padded batch (real positions only)
    second  grad_mode="second": d<R, M_K>/dM0 of the engine against the reference, and of the reference
            against the oracle differentiated through its K steps (R random)

Each path ends "match" (relative error of the memory's update M_K - M0, or of the compared tensors, within
the fp32 bound 1e-5), "refused" (a ValueError/TypeError/NotImplementedError raised inside gradmem_fast),
"WRONG" (numbers differ) or "crash" (any other exception). Models are fp64 where they build and run in fp64:
many families compute softmax, norms or rotary tables in fp32 inside their own forward, so the bound is
fp32's 1e-5 even then (a missing soft-cap or scale is off by far more).
"""

import copy
import dataclasses
import functools
import math
import os
import traceback
from typing import Any

import torch

TOL = 1e-5  # DESIGN.md fp32 bound
M_TOKENS = 2
LENGTHS = (5, 9)
STEPS = 2
LR = 0.1
VOCAB = 96
PATHS = ("torch", "triton", "dropin", "second")
REFUSAL_TYPES = (ValueError, TypeError, NotImplementedError)

# Size fields overridden wherever a config (or one of its sub-configs) has them.
_SIZES = {
    "hidden_size": 32,
    "n_embd": 32,
    "d_model": 32,
    "embed_dim": 32,
    "n_embed": 32,
    "dim": 32,
    "word_embed_proj_dim": 32,
    "num_hidden_layers": 2,
    "n_layer": 2,
    "n_layers": 2,
    "num_layers": 2,
    "decoder_layers": 2,
    "encoder_layers": 2,
    "num_attention_heads": 4,
    "n_head": 4,
    "n_heads": 4,
    "num_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_kv_heads": 2,
    "n_kv_heads": 2,
    "multi_query_group_num": 2,
    "head_dim": 8,
    "rotary_dim": 4,
    "kv_channels": 8,
    "intermediate_size": 64,
    "ffn_dim": 64,
    "n_inner": 64,
    "decoder_ffn_dim": 64,
    "encoder_ffn_dim": 64,
    "ffn_hidden_size": 64,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "expert_intermediate_size": 32,
    "vocab_size": VOCAB,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "moe_k": 2,
    "n_shared_experts": 1,
    "top_k": 2,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    # A window shorter than the 11 rows of the longer document, longer than the padding of the shorter (4
    # keys): a padded query row whose window holds only padding makes transformers' fp64 eager attention
    # produce NaN rows (the additive mask overflows to -inf), which leak into real rows through 0 * NaN.
    "sliding_window": 5,
    "attention_window_size": 5,
    "max_position_embeddings": 64,
    "n_positions": 64,
    "n_ctx": 64,
    "max_seq_len": 64,
    "state_size": 8,
    "ssm_state_size": 8,
    "mamba_d_state": 8,
    "mamba_n_heads": 4,
    "mamba_d_head": 16,
    "mamba_expand": 2,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "lru_width": 32,
    "num_layers_per_stack": 2,
    "H_cycles": 1,
    "L_cycles": 2,
    "image_size": 32,
    "patch_size": 8,
    "num_channels": 3,
}
# Logit and attention post-processing set far from their neutral values (1 or 30), so a path that ignores one
# is off by far more than the bound (a soft-cap of 30 on logits of size ~1 changes them by ~1e-3 only).
_STRESS = {
    "logits_scaling": 4.0,
    "attention_multiplier": 0.3,
    "embedding_multiplier": 3.0,
    "residual_multiplier": 0.5,
    "final_logit_softcapping": 2.0,
    "attn_logit_softcapping": 2.0,
}
# Fields holding one entry per layer: truncated to the tiny layer count (their first entries).
_PER_LAYER_NAMES = ("layer_types", "layers_block_type", "block_types", "mlp_only_layers", "attention_type")

# Per-family overrides where the generic rule fails (a config value the generic sizes contradict).
_OVERRIDES: dict[str, dict[str, Any]] = {
    "gemma3_text": {"layer_types": ["sliding_attention", "full_attention"]},
    "gemma2": {"layer_types": ["sliding_attention", "full_attention"]},
    "cohere2": {"layer_types": ["sliding_attention", "full_attention"]},
    "gpt_oss": {"layer_types": ["sliding_attention", "full_attention"]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "gemma3n_text": {"layer_types": ["sliding_attention", "full_attention"], "num_kv_shared_layers": 0},
    "cohere_compass_text": {"layer_types": ["sliding_attention", "full_attention"]},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "window_size": 5},
}


@dataclasses.dataclass
class FamilyResult:
    model_type: str
    class_name: str
    dtype: str = ""
    build: str = "ok"  # "ok" or the reason it could not be built tiny
    oracle: str = ""  # "ok" or why the model's own forward could not be run
    states: dict = dataclasses.field(default_factory=dict)  # path -> state
    details: dict = dataclasses.field(default_factory=dict)  # path -> detail (error or relative error)

    @property
    def silently_wrong(self) -> bool:
        return any(state == "WRONG" for state in self.states.values())

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def causal_lm_families() -> dict[str, str]:
    """model_type -> causal-LM class name, as transformers ships them."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# Expert counts some configs leave None by default (the model then fails to build without them).
_REQUIRED_WHEN_NONE = ("n_routed_experts", "num_experts_per_tok", "n_shared_experts", "num_local_experts")
_DROPPED_KEYS = ("transformers_version", "architectures", "_name_or_path", "output_attentions")


def _shrink(d: dict, old_layers: int | None) -> dict:
    """Apply the size table to a config dict and (recursively) to its sub-config dicts."""
    layers = d.get("num_hidden_layers", d.get("n_layer", d.get("num_layers", old_layers)))
    out = {k: v for k, v in d.items() if k not in _DROPPED_KEYS}
    for key, value in d.items():
        if key in _DROPPED_KEYS:
            continue
        if key == "num_key_value_heads" and value == d.get("num_attention_heads"):
            out[key] = _SIZES["num_attention_heads"]  # multi-head (or MLA) families stay multi-head
        elif key.endswith("_token_id") and isinstance(value, int) and value >= VOCAB:
            out[key] = VOCAB - 1  # inside the tiny vocabulary (a padding_idx must be)
        elif key.endswith("_token_id") and isinstance(value, list):
            out[key] = [v if v < VOCAB else VOCAB - 1 for v in value if isinstance(v, int)]
        elif isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
            out[key] = {k: v for k, v in value.items() if int(k) < 2}  # per-layer tables
        elif isinstance(value, dict) and ("model_type" in value or key.endswith("_config")):
            out[key] = _shrink(value, layers)
        elif key in _SIZES and isinstance(value, int) and not isinstance(value, bool):
            out[key] = _SIZES[key]
        elif key in _STRESS and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = _STRESS[key]
        elif key in _REQUIRED_WHEN_NONE and value is None:
            out[key] = _SIZES[key]
        elif key in _SIZES and value is not None and key in ("sliding_window", "head_dim"):
            out[key] = _SIZES[key]
        elif key.endswith(("dropout", "pdrop", "_dropout_prob", "dropout_rate")) and isinstance(value, float):
            out[key] = 0.0
        elif isinstance(value, list) and layers and len(value) == layers and layers > 2:
            out[key] = value[:2]
        elif key in _PER_LAYER_NAMES and isinstance(value, list) and len(value) > 2:
            out[key] = value[:2]
    return out


@functools.cache
def tiny_config(model_type: str):
    """(config, None) with tiny sizes, or (None, reason) when the family cannot be built tiny."""
    import transformers

    try:
        # The causal-LM class's own config class: for a composite model type (emu3) it is the text part.
        model_cls = getattr(transformers, causal_lm_families()[model_type], None)
        cls = getattr(model_cls, "config_class", None) or transformers.CONFIG_MAPPING[model_type]
    except Exception as exc:  # noqa: BLE001 (the reason is recorded)
        return None, f"no config class: {_first_line(exc)}"
    try:
        d = cls().to_dict()
    except Exception as exc:  # noqa: BLE001
        return None, f"default config fails: {_first_line(exc)}"
    d = _shrink(d, None)
    d.update(_OVERRIDES.get(model_type, {}))
    d.setdefault("tie_word_embeddings", False)
    try:
        cfg = cls.from_dict(d)
    except Exception as exc:  # noqa: BLE001
        return None, f"tiny config rejected: {_first_line(exc)}"
    return cfg, None


def build_model(model_type: str, dtype=torch.float64, seed: int = 0):
    """(model, None) in eval mode with eager attention, or (None, reason)."""
    import transformers

    cfg, reason = tiny_config(model_type)
    if cfg is None:
        return None, reason
    cfg = copy.deepcopy(cfg)  # the cached config stays as built (a model may change its own config)
    cls_name = causal_lm_families()[model_type]
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        return None, f"class {cls_name} not exported by transformers"
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = cls._from_config(cfg, attn_implementation="eager", experts_implementation="eager")
        model = model.to(dtype).eval()
    except Exception as exc:  # noqa: BLE001
        return None, f"build fails: {_first_line(exc)}"
    return model, None


class WrongShape(Exception):
    """Two results that should agree have different shapes or non-finite values (a WRONG, not a crash)."""


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        raise WrongShape(f"shape {tuple(a.shape)} vs {tuple(b.shape)}")
    den = b.norm().item()
    num = (a - b).norm().item()
    if not math.isfinite(num):  # a NaN/inf on one side: never a match
        side = "ours" if not torch.isfinite(a).all() else "theirs"
        raise WrongShape(f"non-finite values ({side}: {'gradmem_fast' if side == 'ours' else 'the model/oracle'})")
    return num / den if den > 0 else num


def _inputs(vocab: int, d: int, dtype, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, vocab, (n,), generator=gen) for n in LENGTHS]
    S = max(LENGTHS)
    ids = torch.zeros(len(docs), S, dtype=torch.long)
    mask = torch.zeros(len(docs), S, dtype=torch.long)
    for b, doc in enumerate(docs):
        ids[b, : len(doc)] = doc
        mask[b, : len(doc)] = 1
    M0 = (torch.randn(M_TOKENS, d, generator=gen) * 0.5).to(dtype)
    return docs, ids, mask, M0


def oracle_write(model, docs, M0, second: bool = False):
    """The independent write: each document alone through the model's own forward, K SGD steps from M0.

    ``second=False``: grad_mode "none" (each step's memory detached). ``second=True``: grad_mode "second", the
    graph of every step's gradient kept (create_graph), so the result is differentiable w.r.t. ``M0``.
    """
    emb = model.get_input_embeddings()
    out = []
    for doc in docs:
        M = M0 if second else M0.clone()
        n = len(doc)
        for _ in range(STEPS):
            Mk = M if second else M.detach().requires_grad_(True)
            with torch.enable_grad():
                x = torch.cat([Mk, emb(doc[None])[0].detach()], dim=0)[None]
                # An all-ones mask, as a caller passes one: some families (Moshi) build no causal mask without it.
                ones = torch.ones(1, x.shape[1], dtype=torch.long)
                own = model(inputs_embeds=x, attention_mask=ones, use_cache=False)
                logits = own.logits[0, M_TOKENS - 1 : M_TOKENS + n - 1]
                loss = torch.nn.functional.cross_entropy(logits.double(), doc)
                (g,) = torch.autograd.grad(loss, Mk, create_graph=second)
            M = Mk - LR * g.to(Mk.dtype) if second else (Mk - LR * g).detach()
        out.append(M)
    return torch.stack(out)


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ours(filename: str) -> bool:
    """Whether a source file is gradmem_fast's (the package, or the checkout's kernels/ it imports as
    gradmem_fast.kernels), not transformers' or torch's."""
    path = os.path.abspath(filename)
    if os.path.dirname(path) == os.path.join(_REPO, "kernels"):
        return True
    return "gradmem_fast" in path.replace("\\", "/").split("/site-packages/")[-1].split("/")


def _gradmem_refusal(exc: BaseException) -> bool:
    """A refusal: a ValueError/TypeError/NotImplementedError raised by gradmem_fast's own code."""
    frames = traceback.extract_tb(exc.__traceback__)
    return isinstance(exc, REFUSAL_TYPES) and bool(frames) and _ours(frames[-1].filename)


def _classify(exc: BaseException) -> tuple[str, str]:
    if _gradmem_refusal(exc):
        return "refused", _first_line(exc)
    return "crash", _first_line(exc) + _where(exc)


def _where(exc: BaseException) -> str:
    """Where an exception was raised: ``gradmem_fast/<file>`` for our code (kernels included), else the file."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    name = os.path.basename(frames[-1].filename)
    return f" (at {'gradmem_fast/' if _ours(frames[-1].filename) else ''}{name}:{frames[-1].lineno})"


def _write(model, ids, mask, M0, backend, grad_mode="none"):
    from gradmem_fast import MemoryWriter, WriteConfig

    cfg = WriteConfig(num_memory_tokens=M_TOKENS, steps=STEPS, lr=LR, grad_mode=grad_mode)
    return MemoryWriter(model, cfg, backend=backend, compile=False).write(ids, mask, memory=M0)


def _run_path(result: FamilyResult, path: str, fn) -> Any:
    try:
        value = fn()
    except WrongShape as exc:
        result.states[path], result.details[path] = "WRONG", str(exc)
        return None
    except Exception as exc:  # noqa: BLE001 (every outcome is recorded)
        result.states[path], result.details[path] = _classify(exc)
        return None
    return value


def _judge(result: FamilyResult, path: str, err: float | None, against: str, what: str = "") -> None:
    if err is None:  # the comparison itself was judged (different shapes, non-finite values)
        return
    result.states[path] = "match" if err <= TOL else "WRONG"
    result.details[path] = f"rel err {err:.1e}{what} vs {against}"


def _dropin(model, d: int, dtype) -> tuple[float, float] | None:
    """Max relative error of logits and d/d inputs_embeds, gradmem_fast attention vs eager, padded batch."""
    import gradmem_fast
    from gradmem_fast.hf import ATTENTION_NAME

    gen = torch.Generator().manual_seed(2)
    S = 11
    x = torch.randn(2, S, d, generator=gen).to(dtype)
    mask = torch.ones(2, S, dtype=torch.long)
    # Two padded keys, fewer than the sliding window (5): no real query row is fully masked in eager, whose
    # fully masked rows give NaN gradients in some families.
    mask[0, 9:] = 0
    real = mask.bool()

    def run():
        leaf = x.clone().requires_grad_(True)
        with torch.enable_grad():
            xi = leaf * 1.0  # not a leaf: some families scale inputs_embeds in place
            logits = model(inputs_embeds=xi, attention_mask=mask, use_cache=False).logits
            cot = torch.randn(logits[real].shape, generator=torch.Generator().manual_seed(3)).to(logits.dtype)
            (gx,) = torch.autograd.grad((logits[real] * cot).sum(), leaf)
        return logits.detach()[real], gx[real]

    ref_logits, ref_grad = run()
    if not (torch.isfinite(ref_logits).all() and torch.isfinite(ref_grad).all()):
        return None  # the model's own eager forward is not finite on this padded batch: nothing to compare with
    from gradmem_fast import hf

    saved = hf._DEFAULT_BACKEND["backend"]
    gradmem_fast.register_attention("triton")
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        logits, grad = run()
    finally:
        model.set_attn_implementation(previous)
        hf._DEFAULT_BACKEND["backend"] = saved
    return _rel(logits, ref_logits), _rel(grad, ref_grad)


def _second(model, docs, ids, mask, M0) -> tuple[float | None, float | None]:
    """d<R, M_K>/dM0 with grad_mode "second": (engine vs reference, reference vs oracle) relative errors.

    Each is None where both sides are non-finite (a model whose own second derivative is NaN, e.g. a square
    root at 0 inside it, is no fault of ours); a non-finite result on one side only raises ``WrongShape``.
    """
    R = torch.randn(len(LENGTHS), *M0.shape, generator=torch.Generator().manual_seed(4)).to(M0.dtype)
    grads = []
    for backend in ("torch", "triton", "oracle"):
        M = M0.clone().requires_grad_(True)
        with torch.enable_grad():
            if backend == "oracle":
                memory = oracle_write(model, docs, M, second=True)
            else:
                memory = _write(model, ids, mask, M, backend, grad_mode="second").memory
            (g,) = torch.autograd.grad((memory * R).sum(), M)
        grads.append(g.detach())

    def rel(a, b):
        if not torch.isfinite(a).all() and not torch.isfinite(b).all():
            return None
        return _rel(a, b)

    return rel(grads[1], grads[0]), rel(grads[0], grads[2])


def check_family(model_type: str, paths: tuple[str, ...] = PATHS) -> FamilyResult:
    """Run the matrix for one family; see the module docstring."""
    result = FamilyResult(model_type, causal_lm_families().get(model_type, "?"))
    model, dtype = None, None
    reasons = []
    for dt in (torch.float64, torch.float32):
        model, reason = build_model(model_type, dt)
        if model is None:
            result.build = reason
            return result
        # fp64 only if the model's own forward runs in fp64 (some layers hard-code fp32 buffers).
        weight = getattr(model.get_input_embeddings(), "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            emb = type(model.get_input_embeddings()).__name__
            result.build = f"no single [vocab, d] input embedding (get_input_embeddings() is a {emb})"
            return result
        d = weight.shape[1]
        docs, ids, mask, M0 = _inputs(VOCAB, d, dt)
        try:
            oracle = oracle_write(model, docs, M0)
            dtype = dt
            break
        except Exception as exc:  # noqa: BLE001
            reasons.append(f"{str(dt).replace('torch.', '')}: {_first_line(exc)}")
            oracle = None
    if oracle is None:
        result.oracle = "; ".join(reasons)[:400]
        dtype = torch.float32
    else:
        result.oracle = "ok" if not reasons else f"ok in {str(dtype).replace('torch.', '')} ({reasons[0][:200]})"
    result.dtype = str(dtype).replace("torch.", "")
    delta_oracle = None if oracle is None else oracle - M0

    ref = None
    if "torch" in paths:
        ref = _run_path(result, "torch", lambda: _write(model, ids, mask, M0, "torch").memory)
        if ref is not None:
            if delta_oracle is None:
                result.states["torch"], result.details["torch"] = "unchecked", "no oracle"
            else:
                _judge(result, "torch", _run_path(result, "torch", lambda: _rel(ref - M0, delta_oracle)), "oracle")
    if "triton" in paths:
        eng = _run_path(result, "triton", lambda: _write(model, ids, mask, M0, "triton").memory)
        if eng is not None:
            if delta_oracle is not None:
                err = _run_path(result, "triton", lambda: _rel(eng - M0, delta_oracle))
                _judge(result, "triton", err, "oracle")
            elif ref is not None:
                _judge(
                    result, "triton", _run_path(result, "triton", lambda: _rel(eng - M0, ref - M0)), "torch reference"
                )
            else:
                result.states["triton"], result.details["triton"] = "unchecked", "no oracle, no reference"
    if "dropin" in paths:
        errs = _run_path(result, "dropin", lambda: _dropin(model, d, dtype))
        if errs is None and "dropin" not in result.states:
            result.states["dropin"] = "n/a"
            result.details["dropin"] = "non-finite in the model's own eager forward on the padded batch"
        elif errs is not None:
            what = f" (logits {errs[0]:.1e}, grad {errs[1]:.1e})"
            _judge(result, "dropin", max(errs), "eager", what)
    if "second" in paths:
        first_ok = result.states.get("triton") == "match" and result.states.get("torch") == "match"
        if not first_ok:
            result.states["second"], result.details["second"] = "skipped", "first order does not match"
        else:
            errs = _run_path(result, "second", lambda: _second(model, docs, ids, mask, M0))
            if errs is not None and None in errs:
                result.states["second"] = "n/a"
                result.details["second"] = "non-finite in the model's own second derivative (oracle) too"
            elif errs is not None:
                what = f" (reference vs oracle {errs[1]:.1e})"
                _judge(result, "second", max(errs), "torch reference", what)
    return result
