"""GradMemModel: meta-training GradMem as a Hugging Face ``PreTrainedModel`` (drop-in for the published code).

    config = GradMemConfig(base_config=transformers.LlamaConfig(...).to_dict(), n_mem_tokens=8, K=2, lr=0.04,
                           grad_mode="second", use_write_head=True, add_inner_loss_to_outer=True,
                           inner_loss_weight=0.5)
    model = GradMemModel(config)                     # or GradMemModel(config, model=an_existing_causal_lm)
    out = model(context_input_ids=ctx, query_input_ids=qry, labels=labels)
    out.loss.backward()                              # through the K WRITE steps into the weights and ``mem``

What a forward computes, for a batch of B contexts c_b and queries q_b (Q tokens, right-padded):

    p(M)   = [write_st ; P(M) ; write_end]             rows before the context; P = mem_proj (identity if "none")
    WRITE  M_0 = mem (shared, learnable); for k = 0..K-1: the GradMem step of ``gradmem_fast.reference`` on
           [p(M_k) ; E(c_b)]: L_b(M_k) = mean CE of c_b, position r-1 predicting token 0 (r = m + 2 n_ctrl),
           g = d(sum_b L_b)/dM_k (w.r.t. M_k only), clip, M_{k+1} = SGD/Adam(M_k, g)
    READ   x = [read_st ; P(M_K) ; read_end ; E(q_b)]; logits = head(h[r-1 .. r+Q-1])     [B, Q+1, V]
           logits row j predicts query token j; the last row predicts the token after the query
    loss   = CE(logits[:, :Q], labels)  (mean over labels != -100)
             + inner_loss_weight * sum_b L_b(M_{K-1}) / B          with add_inner_loss_to_outer

So the WRITE is our semantics contract (DESIGN.md) with the "memory" of the contract being ``p(M)``: positions
0..r+S-1, right or left padding of the context allowed (documents are right-aligned), per-document mean loss,
clip/update formulas of DESIGN.md item 4, stats before each update. The gradient of each step is taken with
respect to M (the pre-projection memory), as in the published code. Control tokens and the projection are
learned by the outer loop only.

Backends: the inner loop runs on our packed engine (``gradmem_fast.engine``: varlen documents, fused linear
cross-entropy without logits, fused update, O(S) second-order attention) with backend "triton" (default on
CUDA); with backend "torch" (default elsewhere) on ``gradmem_fast.meta_write``, the pure-torch padded step of the
reference without its redundant work (the kept inner loss carries its weight gradients from the step's one
backward; the fused linear cross-entropy for large vocabularies), measured against the published code in
benchmarks/results/2026-12-07-meta-peer/; or on the reference itself (``gradmem_fast.reference``) with backend
"reference".
The READ is one batched forward of the backbone with the model's own attention implementation and the
output head on the Q+1 read rows only. The engine runs its eager-layer step here (no ``CompiledBackbone``:
training batches change shape every step, and second-order steps are eager anyway).

Parameter names follow the published GradMem implementation (``grad_memgpt.py``, class ``GradMemGPT``), so its
``model.safetensors`` load with ``from_pretrained``/``load_state_dict``:

    model.*                          the wrapped causal LM (its own key layout below ``model.``)
    mem                              [n_mem_tokens, d] initial memory
    mem_proj.weight / mem_proj.bias  [d, d] / [d], mem_proj_mode="proj" (initialised to the identity)
    write_st, write_end, read_st, read_end   [n_ctrl_tokens, d] control vectors (n_ctrl_tokens > 0)
    write_head.weight                [V, d], no bias (use_write_head; initialised from the output head)

Logit post-processing (Gemma 2's soft-capping, Cohere's / Granite's scale: ``hf.logit_postprocessing``) is
part of the output head: the WRITE loss through the model's own head and the READ logits apply it, as the
model's forward does; a separate write head is a plain linear (its logits are ``write_head(h)``, no
post-processing), trained as such.

The configuration keeps the published field names as well (``n_mem_tokens``, ``K``, ``lr``, ``use_adam``,
``grad_mode``, ``last_K_second_order``, ``n_ctrl_tokens``, ``inner_clip_value``, ``inner_clip_norm``,
``use_mem_proj``/``mem_proj_mode``, ``use_write_head``, ``add_inner_loss_to_outer``, ``inner_loss_weight``,
``freeze_backbone``, ``pretrained_model``/``base_config``, ``attn_implementation``), so a published
``config.json`` loads too.
Not supported (a clear error): mem_proj_mode "per_sample"/"proj_rw", write LoRA, Hopfield memory, segmenting
the context, the forward ("RMT-style") memory update.

Deliberate differences from the published code: Adam honours ``inner_clip_value``/``inner_clip_norm`` (the
published Adam step always clamps to +-10 and ignores both; our default clamp is also 10); Adam with
grad_mode="second" is refused (the published code silently runs it first-order); K=0 skips the WRITE (the
READ sees the initial memory); a context row with no real token is an error naming the rows.
"""

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from . import engine, hf, meta_write, reference
from .backend import resolve_backend
from .config import WriteConfig
from .inputs import prepare_write
from .ops.cross_entropy import postprocess_logits
from .packing import documents_from_batch, pack

MEM_PROJ_MODES = ("none", "proj")
BACKENDS = ("auto", "torch", "reference", "triton")


class GradMemConfig(PretrainedConfig):
    """Configuration of ``GradMemModel`` (field names as in the published GradMem code).

    Args:
        pretrained_model: name or directory of a causal LM to load as the backbone (or None).
        base_config: the backbone's configuration (a dict with ``model_type``, or a ``PretrainedConfig``) to
            build it from scratch; exactly one of the two, unless a model is passed to ``GradMemModel``.
        n_mem_tokens: m, memory vectors.
        K: WRITE steps (0: no WRITE, the READ sees the initial memory).
        lr: inner step size.
        use_adam: Adam instead of SGD in the inner loop (first-order only).
        grad_mode: "none" | "first" | "second" (DESIGN.md item 6).
        last_K_second_order: with "second", how many of the last steps build the graph of their gradient
            (None: all K); clamped to [0, K] as in the published code.
        n_ctrl_tokens: control vectors on each side of the memory (write_st/write_end, read_st/read_end).
        inner_clip_value / inner_clip_norm: the inner gradient's element clamp and per-document norm clip.
        use_mem_proj / mem_proj_mode: "none" or "proj" (a learned d x d linear applied to the memory where
            it enters the model, in WRITE and READ); use_mem_proj must equal (mem_proj_mode != "none").
        use_write_head: a separate [V, d] head (no bias) for the WRITE loss, initialised from the output head.
        add_inner_loss_to_outer / inner_loss_weight: add ``weight * mean_b L_b(M_{K-1})`` to the loss
            (weight default 1.0 when enabled).
        freeze_backbone: the wrapped model's weights get requires_grad=False (memory, control vectors,
            projection and write head stay trainable).
        attn_implementation: the backbone's attention when built here ("eager": the torch backend's second
            order differentiates attention twice, which SDPA cannot).
        backend: "auto" (triton engine on CUDA, torch elsewhere), "triton", "torch" (``meta_write``) or
            "reference" (``reference.write``, the oracle's own loop).
    """

    model_type = "gradmem_fast"

    def __init__(
        self,
        pretrained_model: str | None = None,
        base_config: Any = None,
        n_mem_tokens: int = 8,
        K: int = 2,
        lr: float = 0.01,
        use_adam: bool = False,
        grad_mode: str = "second",
        last_K_second_order: int | None = None,
        n_ctrl_tokens: int = 0,
        inner_clip_value: float | None = None,
        inner_clip_norm: float | None = None,
        use_mem_proj: bool = False,
        mem_proj_mode: str = "none",
        use_write_head: bool = False,
        add_inner_loss_to_outer: bool = False,
        inner_loss_weight: float | None = None,
        freeze_backbone: bool = False,
        attn_implementation: str = "eager",
        backend: str = "auto",
        **kwargs: Any,
    ) -> None:
        unsupported = {
            "use_write_lora": False,
            "use_hopfield_memory": False,
            "use_reconstruction_loss": False,
            "use_mem_residual": False,
        }
        for name, default in unsupported.items():
            if kwargs.get(name, default) != default:
                raise ValueError(f"{name}={kwargs[name]!r} is not supported by gradmem_fast.GradMemModel")
        if kwargs.get("memory_update", "gradient") != "gradient":
            raise ValueError("memory_update must be 'gradient' (the forward memory update is not supported)")
        if kwargs.get("hopfield_n_segments", 1) != 1:
            raise ValueError("hopfield_n_segments: segmenting the context is not supported")
        super().__init__(**kwargs)
        if isinstance(base_config, PretrainedConfig):
            base_config = base_config.to_dict()
        if base_config is not None and not isinstance(base_config, dict):
            raise TypeError(f"base_config must be a dict or a PretrainedConfig, got {type(base_config).__name__}")
        if pretrained_model is not None and base_config is not None:
            raise ValueError("give only one of pretrained_model and base_config")
        for name, value in (("n_mem_tokens", n_mem_tokens), ("K", K), ("n_ctrl_tokens", n_ctrl_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "n_mem_tokens" else 0):
                raise ValueError(f"{name} must be an int >= {1 if name == 'n_mem_tokens' else 0}, got {value!r}")
        if grad_mode not in ("none", "first", "second"):
            raise ValueError(f"grad_mode must be 'none', 'first' or 'second', got {grad_mode!r}")
        if mem_proj_mode not in MEM_PROJ_MODES:
            raise ValueError(f"mem_proj_mode must be one of {MEM_PROJ_MODES}, got {mem_proj_mode!r}")
        if bool(use_mem_proj) != (mem_proj_mode != "none"):
            raise ValueError("use_mem_proj must be True exactly when mem_proj_mode is not 'none'")
        if use_adam and grad_mode == "second":
            raise ValueError("use_adam: Adam is first-order only; use grad_mode='first' (or SGD for 'second')")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.pretrained_model = pretrained_model
        self.base_config = base_config
        self.n_mem_tokens = n_mem_tokens
        self.K = K
        self.lr = lr
        self.use_adam = bool(use_adam)
        self.grad_mode = grad_mode
        last = K if last_K_second_order is None else last_K_second_order
        self.last_K_second_order = max(0, min(int(last), K)) if grad_mode == "second" else 0
        self.n_ctrl_tokens = n_ctrl_tokens
        self.inner_clip_value = inner_clip_value
        self.inner_clip_norm = inner_clip_norm
        self.use_mem_proj = bool(use_mem_proj)
        self.mem_proj_mode = mem_proj_mode
        self.use_write_head = bool(use_write_head)
        self.add_inner_loss_to_outer = bool(add_inner_loss_to_outer)
        self.inner_loss_weight = inner_loss_weight
        self.freeze_backbone = bool(freeze_backbone)
        self.attn_implementation = attn_implementation
        self.backend = backend

    def write_config(self) -> WriteConfig | None:
        """The ``WriteConfig`` of the inner loop (None when K == 0)."""
        if self.K == 0:
            return None
        second = self.grad_mode == "second"
        return WriteConfig(
            num_memory_tokens=self.n_mem_tokens,
            steps=self.K,
            lr=float(self.lr),
            optimizer="adam" if self.use_adam else "sgd",
            clip_value=self.inner_clip_value,
            clip_norm=self.inner_clip_norm,
            grad_mode=self.grad_mode,
            last_k_second_order=self.last_K_second_order if second else None,
        )

    @property
    def outer_inner_weight(self) -> float:
        """The weight of the inner loss in the outer loss (0 when not added)."""
        if not self.add_inner_loss_to_outer:
            return 0.0
        return 1.0 if self.inner_loss_weight is None else float(self.inner_loss_weight)


@dataclass
class GradMemOutput(ModelOutput):
    """What ``GradMemModel.forward`` returns.

    Attributes:
        loss: the outer loss (READ target loss, plus the weighted inner loss when configured); with labels.
        logits: [B, Q+1, V] READ logits at positions r-1 .. r+Q-1 (r = rows before the query); row j predicts
            query token j, the last row the token after the query.
        target_loss: the READ target loss alone (detached).
        inner_loss: mean over the batch of the last WRITE step's loss (detached; the value the outer loss adds).
        inner_losses: [K, B] each document's loss before each step's update (detached).
        inner_grad_norms: [K, B] raw (pre-clip) norm of each document's memory gradient per step.
        memory: [B, m, d] the written memories (on the graph), with ``return_mem=True``.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    target_loss: torch.Tensor | None = None
    inner_loss: torch.Tensor | None = None
    inner_losses: torch.Tensor | None = None
    inner_grad_norms: torch.Tensor | None = None
    memory: torch.Tensor | None = None


def _build_backbone(config: GradMemConfig) -> torch.nn.Module:
    if config.pretrained_model is not None:
        return transformers.AutoModelForCausalLM.from_pretrained(
            config.pretrained_model, attn_implementation=config.attn_implementation
        )
    if config.base_config is None:
        raise ValueError("GradMemConfig needs pretrained_model or base_config (or pass model= to GradMemModel)")
    fields = dict(config.base_config)
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise ValueError("base_config must contain 'model_type' (e.g. a PretrainedConfig's to_dict())")
    base = transformers.AutoConfig.for_model(model_type, **fields)
    return transformers.AutoModelForCausalLM.from_config(base, attn_implementation=config.attn_implementation)


class GradMemModel(PreTrainedModel):
    """A causal LM with a learnable GradMem memory, meta-trained through K WRITE steps (module docstring).

    Args:
        config: a ``GradMemConfig``.
        model: optional existing causal LM to wrap (then ``config.pretrained_model``/``base_config`` are
            ignored, and ``base_config`` is filled in from it so that ``save_pretrained`` round-trips).
    """

    config_class = GradMemConfig
    base_model_prefix = "gradmem"
    main_input_name = "context_input_ids"
    supports_gradient_checkpointing = False

    def __init__(self, config: GradMemConfig, model: torch.nn.Module | None = None) -> None:
        if model is not None and config.pretrained_model is None and config.base_config is None:
            config.base_config = model.config.to_dict()
        super().__init__(config)
        self.model = _build_backbone(config) if model is None else model
        hf.input_embeddings(self.model)
        head = hf.output_head(self.model)
        d = hf.hidden_size(self.model)
        weight = hf.input_embeddings(self.model).weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.mem = torch.nn.Parameter(torch.randn(config.n_mem_tokens, d, **factory) * 0.02)
        self.mem_proj = None
        if config.mem_proj_mode == "proj":
            self.mem_proj = torch.nn.Linear(d, d, bias=True, **factory)
            with torch.no_grad():
                torch.nn.init.eye_(self.mem_proj.weight)
                self.mem_proj.bias.zero_()
        if config.n_ctrl_tokens > 0:
            for name in ("write_st", "write_end", "read_st", "read_end"):
                setattr(self, name, torch.nn.Parameter(torch.randn(config.n_ctrl_tokens, d, **factory) * 0.02))
        if config.freeze_backbone:
            self.model.requires_grad_(False)
        self.write_head = None
        if config.use_write_head:
            self.write_head = torch.nn.Linear(d, head.weight.shape[0], bias=False, **factory)
            with torch.no_grad():
                self.write_head.weight.copy_(head.weight)
        if model is not None:
            # A model passed in arrives initialised (or pretrained): mark it so that post_init (which gathers
            # the tied-weight keys save_pretrained needs) initialises nothing of it again. A backbone built
            # here initialised itself, or (inside from_pretrained, on the meta device) is left to
            # from_pretrained, which initialises what the checkpoint lacks (e.g. rotary tables).
            for module in self.model.modules():
                module._is_hf_initialized = True
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing to initialise: the backbone comes initialised, and __init__ initialises the memory parts."""

    def get_input_embeddings(self) -> torch.nn.Module:
        return hf.input_embeddings(self.model)

    def get_output_embeddings(self) -> torch.nn.Module:
        return hf.output_head(self.model)

    def floating_point_ops(self, *args: Any, **kwargs: Any) -> int:
        """The Trainer's FLOP count hook (it assumes one token tensor): not estimated for the meta step."""
        return 0

    # ------------------------------------------------------------------------------------------ parts
    @property
    def prefix_rows(self) -> int:
        """r: rows before the context (WRITE) or the query (READ): memory plus control vectors."""
        return self.config.n_mem_tokens + 2 * self.config.n_ctrl_tokens

    def _project(self, memory: torch.Tensor) -> torch.Tensor:
        return memory if self.mem_proj is None else self.mem_proj(memory)

    def _with_controls(self, rows: torch.Tensor, start: str, end: str) -> torch.Tensor:
        if self.config.n_ctrl_tokens == 0:
            return rows
        B = rows.shape[0]
        st, en = getattr(self, start), getattr(self, end)
        return torch.cat([st.expand(B, -1, -1).to(rows.dtype), rows, en.expand(B, -1, -1).to(rows.dtype)], dim=1)

    def write_prefix(self, memory: torch.Tensor) -> torch.Tensor:
        """[write_st ; P(memory) ; write_end]: the rows before the context, [B, r, d]."""
        return self._with_controls(self._project(memory), "write_st", "write_end")

    def read_prefix(self, memory: torch.Tensor) -> torch.Tensor:
        """[read_st ; P(memory) ; read_end]: the rows before the query, [B, r, d]."""
        return self._with_controls(self._project(memory), "read_st", "read_end")

    def _backend(self) -> str:
        """The backend that runs: "triton", "torch" (``meta_write``) or "reference" (``reference.write``);
        "auto" is triton on CUDA, torch elsewhere."""
        if self.config.backend == "reference":
            return "reference"
        return resolve_backend(self.config.backend, self.mem.device)

    def _context_mask(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The context's attention mask; without one, tokens equal to the backbone's pad id are padding (as in
        the published code), or none is when it has no pad id."""
        if mask is not None:
            return mask
        pad = getattr(self.model.config, "pad_token_id", None)
        return torch.ones_like(ids) if pad is None else (ids != pad).long()

    def write(self, context_input_ids: torch.Tensor, context_attention_mask: torch.Tensor | None = None):
        """Run the K WRITE steps from ``mem``; returns the ``WriteResult`` (``last_loss`` kept on the graph
        when the inner loss enters the outer loss)."""
        cfg = self.config.write_config()
        if not torch.is_grad_enabled() and cfg.grad_mode != "none":
            # Evaluation under no_grad: nothing will differentiate the result, and the three grad modes give the
            # same values (they differ only in the graph kept for the outer backward), so run the plain write.
            # The first/second-order loops need the outer graph (they raised under no_grad before).
            cfg = replace(cfg, grad_mode="none", last_k_second_order=None)
        mask = self._context_mask(context_input_ids, context_attention_mask)
        prefix = None if self.mem_proj is None and self.config.n_ctrl_tokens == 0 else self.write_prefix
        keep = self.config.outer_inner_weight != 0.0
        backend = self._backend()
        if backend == "torch":
            ids, mask, M, head_weight, head_bias = prepare_write(
                self.model, context_input_ids, mask, self.mem, cfg, self.write_head
            )
            # The kept loss may carry the gradients of every trainable tensor but the initial memory (which is
            # upstream of M, so its gradient flows through M).
            params = [p for name, p in self.named_parameters() if p.requires_grad and name != "mem"]
            return meta_write.write(self.model, ids, mask, M, cfg, head_weight, head_bias, prefix, keep, params)
        if backend == "reference":
            return reference.write(
                self.model,
                context_input_ids,
                mask,
                self.mem,
                cfg,
                self.write_head,
                memory_input=prefix,
                keep_last_loss=keep,
            )
        engine.check_model_supported(self.model)
        ids, mask, M, head_weight, head_bias = prepare_write(
            self.model, context_input_ids, mask, self.mem, cfg, self.write_head
        )
        docs = [doc.cpu() for doc in documents_from_batch(ids, mask)]
        packed = pack(docs, self.prefix_rows, M.device)
        return engine.write_packed(
            self.model, packed, M, cfg, head_weight, head_bias, backend, memory_input=prefix, keep_last_loss=keep
        )

    def read_logits(
        self, memory: torch.Tensor, query_input_ids: torch.Tensor, query_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """READ logits [B, Q+1, V] at positions r-1 .. r+Q-1 of ``[read_st ; P(memory) ; read_end ; E(query)]``
        (queries right-padded; the mask, if given, is passed to the attention)."""
        emb = hf.input_embeddings(self.model)
        B, Q = query_input_ids.shape
        prefix = self.read_prefix(memory)
        r = prefix.shape[1]
        x = torch.cat([prefix.to(emb.weight.dtype), emb(query_input_ids)], dim=1)
        mask = torch.ones(B, r + Q, dtype=torch.long, device=x.device)
        if query_attention_mask is not None:
            mask[:, r:] = query_attention_mask.to(mask.device).long()
        positions = torch.arange(r + Q, device=x.device).unsqueeze(0).expand(B, -1)
        hidden = hf.backbone_hidden(self.model, x, mask, positions)
        head = hf.output_head(self.model)
        logits = F.linear(hidden[:, r - 1 :], head.weight, getattr(head, "bias", None))
        return postprocess_logits(logits, *hf.logit_postprocessing(self.model))

    # ---------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: Any = None,
        labels: torch.Tensor | None = None,
        context_input_ids: torch.Tensor | None = None,
        query_input_ids: torch.Tensor | None = None,
        context_attention_mask: torch.Tensor | None = None,
        query_attention_mask: torch.Tensor | None = None,
        return_mem: bool = False,
        **kwargs: Any,
    ) -> GradMemOutput:
        """WRITE the contexts, READ the queries; see the module docstring for the formulas.

        Inputs: ``context_input_ids`` [B, S] (padding by ``context_attention_mask``, or tokens equal to the
        backbone's pad id), ``query_input_ids`` [B, Q] right-padded, ``labels`` [B, Q] aligned with the query
        (-100 = no loss; label j is predicted by READ row j). As in the published code, ``input_ids`` may be a
        dict holding ``context_input_ids``/``query_input_ids`` (and optionally the masks).
        """
        if isinstance(input_ids, Mapping):
            context_input_ids = input_ids.get("context_input_ids", context_input_ids)
            query_input_ids = input_ids.get("query_input_ids", query_input_ids)
            context_attention_mask = input_ids.get("context_attention_mask", context_attention_mask)
            query_attention_mask = input_ids.get("query_attention_mask", query_attention_mask)
        elif input_ids is not None:
            raise TypeError("input_ids must be a dict with context_input_ids/query_input_ids (or pass them directly)")
        if not isinstance(context_input_ids, torch.Tensor) or not isinstance(query_input_ids, torch.Tensor):
            raise ValueError("context_input_ids and query_input_ids must both be given as [B, S] / [B, Q] tensors")
        if query_input_ids.dim() != 2 or query_input_ids.shape[0] != context_input_ids.shape[0]:
            raise ValueError(
                f"query_input_ids must be [B={context_input_ids.shape[0]}, Q], got {tuple(query_input_ids.shape)}"
            )
        B = context_input_ids.shape[0]
        if self.config.K > 0:
            result = self.write(context_input_ids, context_attention_mask)
            memory, losses, norms, last = result.memory, result.losses, result.grad_norms, result.last_loss
        else:
            memory, losses, norms, last = self.mem.unsqueeze(0).expand(B, -1, -1), None, None, None
        logits = self.read_logits(memory, query_input_ids, query_attention_mask)
        out = GradMemOutput(
            logits=logits,
            inner_losses=losses,
            inner_grad_norms=norms,
            inner_loss=None if losses is None else losses[-1].mean(),
            memory=memory if return_mem else None,
        )
        if labels is None:
            return out
        if labels.shape != query_input_ids.shape:
            raise ValueError(
                f"labels must have the shape of query_input_ids {tuple(query_input_ids.shape)}, "
                f"got {tuple(labels.shape)}"
            )
        read = logits[:, :-1]
        read = read.to(torch.promote_types(read.dtype, torch.float32))  # fp32 softmax for 16-bit models
        target = F.cross_entropy(
            read.reshape(-1, read.shape[-1]), labels.reshape(-1).to(read.device), ignore_index=-100
        )
        loss = target
        weight = self.config.outer_inner_weight
        if weight and last is not None:
            loss = target + weight * last.sum() / B
        out.loss = loss
        out.target_loss = target.detach()
        return out
