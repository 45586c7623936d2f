"""The kernel-backed WRITE loop: packed documents, frozen weights, fused loss and update.

One step for B documents packed into one varlen sequence (``gradmem_fast.packing``):

    x0     = E(tokens) at the token rows, zeros at the memory rows     [T, d], built once per write
    x      = x0 with the memory rows set to M.reshape(B*m, d)           (only these rows change per step)
    h      = backbone(x, positions restarting per document, varlen attention on cu_seqlens)
    L_b    = linear_cross_entropy(h[loss_rows], W, tokens, reduction="sample_mean", cu_seqlens=cu_tokens)
    g      = d(sum_b L_b)/dM                 (only the memories' gradient: no weight-gradient matmuls)
    M, |g| = memory_update(M, g, ...)        (fused clip + SGD/Adam, per-document norms on the device)

Attention goes through the model's own layers with the attention implementation switched to the
registered ``"gradmem_fast"`` entry for the duration of the call (transformers' AttentionInterface); the
varlen offsets travel as the ``cu_seq_lens_q/k`` and ``max_length_q/k`` keyword arguments that
transformers forwards to attention functions. The engine's backend reaches the attention explicitly (the
registry entry's backend), and ``with use_backend(...)`` covers every other op. Inside the K-step loop
nothing reads a value back to the host.

Compiled step (``CompiledBackbone``, grad_mode "none"/"first"): ``x -> h`` (the whole backbone) goes through
``torch.compile(fullgraph=True)``; AOTAutograd derives the input-gradient backward, our attention stays an
opaque custom op (``gradmem_fast::attention_fwd``/``_bwd``, with fake implementations) and inductor fuses the
model's norms, activations, rotary and residual adds around it. Weights enter as detached inputs
(``torch.func.functional_call``), so the compiled backward forms no weight gradient. One compiled function
per (packed rows, dtype, device, ``seqlen_bucket(max_seqlen)``): the number of documents is a dynamic
dimension (only the offsets' length depends on it), and batches are padded to ``packing.bucket_rows``, so a
``write_many`` stream needs a handful of compiles (``packing.padding_waste`` counts them). The loss
(``linear_cross_entropy``) and the update stay eager: each is already a few fused kernels. Second-order steps
stay eager (torch.compile has no double backward).
"""

import contextlib
import dataclasses
import types

import torch

from . import alignment, hf, hf_contract, lowrank
from .backend import use_backend
from .config import WriteConfig
from .inputs import head_logit_transform
from .ops.attention import dropout_generator
from .ops.cross_entropy import linear_cross_entropy
from .ops.update import memory_update
from .packing import IGNORE_INDEX, PackedBatch, seqlen_bucket
from .result import WriteResult

ATTENTION_NAME = "gradmem_fast"

# Config fields through which Hugging Face models pass an attention dropout probability.
_ATTENTION_DROPOUT_FIELDS = ("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob")


def check_model_supported(model) -> None:
    """Raise a ValueError unless the packed engine computes ``model`` exactly (``hf_contract.check_packed_engine``:
    attention through transformers' AttentionInterface and no other sequence-mixing layer)."""
    hf_contract.check_packed_engine(model, hf.backbone(model))


def attention_dropout_active(model) -> bool:
    """Whether ``model`` would call attention with dropout (training mode and a nonzero probability).

    Such a model reads and advances the device's dropout generator in every attention call
    (``ops.attention.dropout_generator``, an int64 device tensor), so compiled and graph-replayed steps draw
    new masks; the engine creates that generator before tracing or capturing.
    """
    if not model.training:
        return False
    config = getattr(model, "config", None)
    return any(float(getattr(config, name, 0.0) or 0.0) > 0 for name in _ATTENTION_DROPOUT_FIELDS)


@contextlib.contextmanager
def gradmem_attention(model, backend: str = "auto"):
    """Temporarily switch ``model`` to the registered gradmem_fast attention, running on ``backend``.

    The backend is set on the registry entry (a plain global that a compiled graph guards on) rather than
    left to ``use_backend``'s context variable, which torch.compile cannot read; both are restored after.
    """
    previous_backend = hf._DEFAULT_BACKEND["backend"]
    previous_packed = hf._DEFAULT_BACKEND["packed"]
    hf.register_attention(backend)
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    # Every attention call inside must carry the packed offsets: a model that drops them on the way (a layer
    # without **kwargs) would attend across documents; the attention function refuses such a call.
    hf._DEFAULT_BACKEND["packed"] = True
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        hf._DEFAULT_BACKEND["backend"] = previous_backend
        hf._DEFAULT_BACKEND["packed"] = previous_packed


def _backbone_hidden(base, weights, x, position_ids, cu, ones_mask, max_seqlen):
    """Final hidden states [T, d] of the backbone for packed ``x`` [1, T, d]. ``weights``: None (the module's
    own parameters) or detached parameters and buffers by name (the compiled step's frozen inputs).

    The all-ones 2-D mask keeps transformers from inspecting position_ids for packed sequences (a host
    synchronisation); the varlen offsets are what the attention actually uses (transformers forwards these
    keyword arguments to the attention function).
    """
    kwargs = dict(
        inputs_embeds=x,
        attention_mask=ones_mask,
        position_ids=position_ids,
        use_cache=False,
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=max_seqlen,
        max_length_k=max_seqlen,
    )
    out = base(**kwargs) if weights is None else torch.func.functional_call(base, weights, args=(), kwargs=kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden[0]


class CompiledBackbone:
    """``x -> backbone hidden states`` compiled with ``torch.compile(fullgraph=True)``, one function per shape key.

    Key: (packed rows, dtype, device, seqlen bucket); the offsets' length (the number of documents) is
    dynamic. Each key gets its own copy of the function's code object, so dynamo's per-code cache holds one
    entry per key (no recompile limit to hit, and ``compiles`` counts exactly the compiles: a test checks
    dynamo's own counters agree). ``backend``: torch.compile backend ("inductor"; tests may use others).
    """

    def __init__(self, model, backend: str = "inductor"):
        self.model = model
        self.base = hf.backbone(model)
        self.compile_backend = backend
        self.functions = {}

    @property
    def compiles(self) -> int:
        return len(self.functions)

    def frozen_weights(self) -> dict:
        """The backbone's parameters and buffers, detached: the compiled backward then computes only the
        input gradient (AOTAutograd would otherwise form every weight gradient of a trainable model)."""
        named = list(self.base.named_parameters(remove_duplicate=False))
        named += list(self.base.named_buffers(remove_duplicate=False))
        return {name: t.detach() for name, t in named}

    def __call__(self, x, packed: PackedBatch, ones_mask, weights=None):
        max_seqlen = seqlen_bucket(packed.max_seqlen)
        key = (tuple(x.shape), x.dtype, x.device, max_seqlen)
        fn = self.functions.get(key)
        if fn is None:
            code = _backbone_hidden.__code__.replace()  # a fresh code object: a cache of its own
            fresh = types.FunctionType(code, _backbone_hidden.__globals__, _backbone_hidden.__name__)
            fn = self.functions[key] = torch.compile(fresh, fullgraph=True, dynamic=False, backend=self.compile_backend)
            torch._dynamo.maybe_mark_dynamic(packed.cu_seqlens, 0)
        weights = self.frozen_weights() if weights is None else weights
        return fn(self.base, weights, x, packed.position_ids, packed.cu_seqlens, ones_mask, max_seqlen)


def packed_input(packed: PackedBatch, token_embeds: torch.Tensor, d: int = None) -> torch.Tensor:
    """``x0`` [T, d]: the token embeddings at their packed rows, zeros at the memory rows (built once)."""
    d = token_embeds.shape[-1] if d is None else d
    x0 = token_embeds.new_zeros(packed.total_rows, d)
    return x0.index_put((packed.token_rows,), token_embeds)


def _step_loss(
    model,
    memories,
    x0,
    packed: PackedBatch,
    head_weight,
    head_bias,
    ones_mask=None,
    second_order=False,
    backbone=None,
    weights=None,
    return_hidden=False,
):
    """Per-document mean losses [B] of one step; with ``return_hidden`` also the hidden rows that predict
    the tokens (what a cramming check scores, so the check needs no forward of its own)."""
    B, m, d = memories.shape
    # Only the memory rows change from step to step: an out-of-place scatter into the packed input, whose
    # backward is a gather of the B*m memory rows.
    x = x0.index_put((packed.memory_rows,), memories.reshape(B * m, d).to(x0.dtype)).unsqueeze(0)
    if ones_mask is None:
        ones_mask = torch.ones(1, x.shape[1], dtype=torch.long, device=x.device)
    if backbone is None or second_order:
        hidden = _backbone_hidden(
            hf.backbone(model), None, x, packed.position_ids, packed.cu_seqlens, ones_mask, packed.max_seqlen
        )
    else:
        hidden = backbone(x, packed, ones_mask, weights)
    h = hidden.index_select(0, packed.loss_rows)
    # The model's own logit scale / soft-capping (Cohere, Granite, Gemma 2, ...), none for a separate write head.
    logit_scale, softcap = head_logit_transform(model, head_weight)
    if not second_order:
        # Only a second-order step differentiates through the head. A custom autograd op cannot tell which
        # of its inputs the current autograd.grad call needs, so hand it a frozen head: no dW/db work.
        head_weight = head_weight.detach()
        head_bias = None if head_bias is None else head_bias.detach()
    # A second-order step differentiates the loss's backward, so the gradient must not be pre-formed.
    loss = linear_cross_entropy(
        h,
        head_weight,
        packed.targets,
        head_bias,
        reduction="sample_mean",
        cu_seqlens=packed.cu_tokens,
        ignore_index=IGNORE_INDEX,
        precompute_grad=None if not second_order else False,
        logit_scale=logit_scale,
        softcap=softcap,
    )
    return (loss, h) if return_hidden else loss


def _write_loop(
    model,
    packed,
    memory,
    config,
    head_weight,
    head_bias,
    lrs,
    losses,
    norms,
    ones_mask=None,
    on_step=None,
    backbone=None,
    memory_input=None,
    kept=None,
):
    """The K steps; writes per-step stats into ``losses``/``norms`` [K, B] and returns the final memory.

    ``memory_input`` / ``kept`` (a list receiving the last step's loss): the meta-training hooks of
    ``write_packed``.

    ``lrs``: the K step sizes (``config.lr_at(k)``), a list of floats or a [K] device tensor (a graph replays
    with the tensor's current values).
    Nothing here reads a tensor back to the host, so the loop can be captured in a CUDA graph (``on_step``,
    a per-step callback ``on_step(k, losses[k])``, is for uncaptured loops only; unset, it costs nothing).
    ``backbone``: a ``CompiledBackbone`` for the first-order steps, or None (eager).
    """
    clip_value = config.effective_clip_value
    emb = hf.input_embeddings(model)
    M, state = memory, None
    token_embeds = emb(packed.tokens)
    if config.grad_mode == "none" and kept is None:
        token_embeds = token_embeds.detach()
    x0 = packed_input(packed, token_embeds)  # built once per write, not once per step
    if ones_mask is None:
        ones_mask = torch.ones(1, packed.total_rows, dtype=torch.long, device=token_embeds.device)
    weights = None if backbone is None else backbone.frozen_weights()
    low, active = None, None
    if config.memory_rank is not None:  # low-rank memories: the update acts on z (gradmem_fast.lowrank)
        low, z, M = lowrank.start(config, model, memory, memory_input)
        if packed.batch > packed.real_batch:  # bucket filler documents take no part in a learned basis
            active = torch.arange(packed.batch, device=M.device) < packed.real_batch
    for k in range(config.steps):
        second = config.second_order_step(k)
        Mk = M.detach().requires_grad_(True) if config.grad_mode == "none" or not M.requires_grad else M
        # A kept loss is differentiated again by the outer loss: trainable head and eager backbone, as in
        # a second-order step, and its graph retained.
        keep = kept is not None and k == config.steps - 1
        rows = Mk if memory_input is None else memory_input(Mk)
        loss = _step_loss(model, rows, x0, packed, head_weight, head_bias, ones_mask, second or keep, backbone, weights)
        (grad,) = torch.autograd.grad(loss.sum(), Mk, create_graph=second, retain_graph=second or keep)
        if keep:
            kept.append(loss)
        losses[k].copy_(loss.detach())
        if on_step is not None:
            on_step(k, losses[k])
        if low is not None:
            lr_k = lrs[k] if isinstance(lrs, list) else lrs[k : k + 1]
            z, M, norm, state = low.step(
                z, Mk.detach(), grad.detach(), lr=lr_k, state=state, step=k + 1, config=config, active=active
            )
            norms[k].copy_(norm)
            continue
        with torch.set_grad_enabled(config.grad_mode != "none"):
            result = memory_update(
                Mk,
                grad if second else grad.detach(),
                lr=lrs[k] if isinstance(lrs, list) else lrs[k : k + 1],
                optimizer=config.optimizer,
                clip_value=clip_value,
                clip_norm=config.clip_norm,
                state=state,
                step=k + 1,
                betas=config.adam_betas,
                weight_decay=config.weight_decay,
            )
        norms[k].copy_(result.grad_norm)
        M, state = result.memory, result.state
        if config.grad_mode == "none":
            M = M.detach()
    return M


def write_packed(
    model,
    packed: PackedBatch,
    memory: torch.Tensor,
    config: WriteConfig,
    head_weight,
    head_bias,
    backend: str,
    on_step=None,
    backbone=None,
    memory_input=None,
    keep_last_loss=False,
) -> WriteResult:
    """Run ``config.steps`` WRITE steps on a packed batch; ``memory`` is [B, m, d] (B = packed.batch).

    ``on_step(k, losses)``: optional callback after step k's loss (the real documents' [B], detached).
    ``backbone``: optional ``CompiledBackbone`` (compiled first-order steps; see the module docstring).
    Meta-training hooks (``gradmem_fast.model``): ``memory_input(M)`` maps the memory [B, m, d] to the
    ``packed.num_memory_tokens`` rows placed before each document (the gradient is still w.r.t. M);
    ``keep_last_loss`` returns the last step's losses [B] on the graph as ``WriteResult.last_loss``.
    """
    alignment.check_backend(config, "triton")  # never run a write without the term it asks for
    kept: list | None = [] if keep_last_loss else None
    if backbone is not None and attention_dropout_active(model):
        # The compiled step reads and advances the device's dropout generator; created here, before tracing,
        # it is a plain graph input (created inside the trace, the next call would recompile once).
        dropout_generator(memory.device)
    losses = torch.empty(config.steps, packed.batch, dtype=torch.float32, device=memory.device)
    norms = torch.empty_like(losses)
    with use_backend(backend), gradmem_attention(model, backend), torch.enable_grad():
        step_hook = None if on_step is None else (lambda k, loss: on_step(k, loss[: packed.real_batch]))
        M = _write_loop(
            model,
            packed,
            memory,
            config,
            head_weight,
            head_bias,
            [config.lr_at(k) for k in range(config.steps)],
            losses,
            norms,
            on_step=step_hook,
            backbone=backbone,
            memory_input=memory_input,
            kept=kept,
        )
    B = packed.real_batch
    last_loss = kept[0][:B] if kept else None
    return WriteResult(memory=M[:B], losses=losses[:, :B], grad_norms=norms[:, :B], last_loss=last_loss)


def capture_cuda_graph(fn):
    """Run ``fn`` twice on a side stream (torch.compile and Triton compile and autotune every kernel there),
    then capture it in a CUDA graph. Returns ``(replay, outputs)``: the outputs are the captured call's
    tensors, which every ``replay()`` overwrites in place."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


class GraphedWriteLoop:
    """The whole K-step loop (grad_mode "none") captured once per fixed shape and replayed (CUDA only).

    Batches are padded to ``packing.bucket_rows`` rows (filler documents, their count rounded to a multiple of
    8 where the filler allows), so a handful of graphs serve every batch; each replay copies the new batch into
    the graph's static buffers. With a ``CompiledBackbone`` the compiled step runs inside the captured graph:
    inductor's code is plain kernel launches, compiled during the warm-up runs before capture, so the two
    combine (torch.compile's own CUDA graphs, mode="reduce-overhead", are not used: a cudagraph tree cannot
    be nested inside this capture, and this capture also covers the eager loss and update kernels).
    Attention dropout works: its seed is read from the device's dropout generator (a device tensor that each
    attention call advances in place), so every replay draws new masks.
    """

    _STATIC = (
        "tokens",
        "targets",
        "cu_seqlens",
        "position_ids",
        "source_index",
        "loss_rows",
        "cu_tokens",
        "memory_rows",
        "token_rows",
    )

    def __init__(self, model, config: WriteConfig, head_weight, head_bias, backend: str, backbone=None):
        if config.grad_mode != "none":
            raise ValueError("CUDA graphs capture detached writes only: grad_mode must be 'none'")
        self.model, self.config = model, config
        self.head_weight, self.head_bias = head_weight, head_bias
        self.backend = backend
        self.backbone = backbone
        self.graphs = {}

    @staticmethod
    def key(packed: PackedBatch):
        return packed.batch, int(packed.tokens.numel()), packed.total_rows, seqlen_bucket(packed.max_seqlen)

    def _capture(self, packed: PackedBatch, memory: torch.Tensor):
        key = self.key(packed)
        static = dataclasses.replace(
            packed, max_seqlen=key[3], **{name: getattr(packed, name).clone() for name in self._STATIC}
        )
        state = {
            "packed": static,
            "memory": memory.detach().clone(),
            # fp64 step sizes for fp64 memories (the eager loop's Python floats), as the slot loop's lr table
            "lr": torch.tensor(
                [self.config.lr_at(k) for k in range(self.config.steps)],
                dtype=torch.float64 if memory.dtype == torch.float64 else torch.float32,
                device=memory.device,
            ),
            "ones": torch.ones(1, static.total_rows, dtype=torch.long, device=memory.device),
            "losses": torch.empty(self.config.steps, static.batch, dtype=torch.float32, device=memory.device),
        }
        state["norms"] = torch.empty_like(state["losses"])

        def run():
            return _write_loop(
                self.model,
                static,
                state["memory"],
                self.config,
                self.head_weight,
                self.head_bias,
                state["lr"],
                state["losses"],
                state["norms"],
                state["ones"],
                backbone=self.backbone,
            )

        state["replay"], state["out"] = capture_cuda_graph(run)
        self.graphs[key] = state
        return state

    def __call__(self, packed: PackedBatch, memory: torch.Tensor) -> WriteResult:
        if attention_dropout_active(self.model):
            dropout_generator(memory.device)  # exists before any capture: replays read and advance it
        with use_backend(self.backend), gradmem_attention(self.model, self.backend), torch.enable_grad():
            state = self.graphs.get(self.key(packed)) or self._capture(packed, memory)
            static = state["packed"]
            for name in self._STATIC:
                getattr(static, name).copy_(getattr(packed, name), non_blocking=True)
            state["memory"].copy_(memory)
            state["replay"]()
        B = packed.real_batch
        return WriteResult(
            memory=state["out"][:B].clone(),
            losses=state["losses"][:, :B].clone(),
            grad_norms=state["norms"][:, :B].clone(),
        )
