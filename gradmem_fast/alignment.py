"""The activation-alignment term of the "hybrid" write loss (``WriteConfig.alignment_weight``; torch backend).

Progressive Cramming's hybrid loss adds to the cross-entropy a term that pulls the hidden states of the
memory run towards those of the same text run without any memory. For document b (n_b tokens, memory
M_b [m, d], g = ``given_tokens``) and the hidden-state outputs H^0..H^L of the backbone, as its
``output_hidden_states`` gives them (H^0 the input embeddings, H^l the output of layer l, H^L the last
layer's output after the final norm, i.e. the backbone's ``last_hidden_state``):

    h^l_bj = H^l([M_b ; E(c_b)])[m + j]     memory run, positions 0 .. m+n_b-1: token j at its own row m + j
    t^l_bj = H^l(E(c_b))[j]                 text run: the document alone, positions 0 .. n_b-1; computed once
                                            per document, without gradient (a constant target)
    cos(h, t) = <h, t> / max(||h|| ||t||, 1e-8)
    J_b = {j : g <= j < n_b}                the scored tokens (those the cross-entropy predicts)
    A_b = sum_{l = L-N+1 .. L} sum_{j in J_b} (1 - cos(h^l_bj, t^l_bj)) / (N |J_b|)      (0 when J_b is empty)
    objective_b = L_b + alpha A_b           what each step differentiates (alpha = alignment_weight,
                                            N = alignment_layers, default L)

``L_b`` (the cross-entropy) stays the reported loss: stop rules, exactness, ``WriteResult.losses`` and
the statistics all use it; the reference reports A_b separately (``WriteResult.alignment_losses``), and
the reported gradient norm is that of the objective's gradient. The term is computed in fp32 for 16-bit
models (fp64 stays fp64).

Against the peer (progressive_cramming, ``--loss_type cosine --hybrid_alpha a --num_alignment_layers N
--inverted_alignment``): the same hidden states (its ``output_hidden_states``, last entry after the final
norm), the same token-by-token pairing (memory-run row m + j against text-run row j, the text run at
positions 0..n-1) and a detached text run. Differences, each on purpose: the peer *sums* the N layers' means
(our alpha = N times its alpha) and averages over every position of the padded batch, padding included (a
document's term then depends on its batch); we average per document over its scored tokens, so each memory's
gradient is its own document's (DESIGN.md item 3). The peer's default direction takes the *first* N entries
starting with H^0, the input embeddings, which are equal in both runs at the token rows (a constant 0);
we take the last N layers only (its ``--inverted_alignment``) and never count H^0.

Why not the engine: its packed backbone keeps no per-layer hidden states and the text run would need a
second packing without memory rows; a write with ``alignment_weight > 0`` is refused on
``backend="triton"`` (``check_backend``) rather than run without the term.
"""

import dataclasses

import torch

from . import hf

COSINE_EPS = 1e-8


@dataclasses.dataclass
class AlignmentTargets:
    """The text run's hidden states of a right-padded batch, the constant targets of the alignment term.

    Attributes:
        states: [N, B, S, d] detached hidden states H^{L-N+1..L}(E(c_b))[j], zero at padding.
        scored: [B, S] bool, the tokens J_b the term averages over (real and j >= given_tokens).
        weight: alpha.
    """

    states: torch.Tensor
    scored: torch.Tensor
    weight: float


def check_backend(config, backend: str) -> None:
    """Refuse the alignment term on a backend that cannot compute it (the engine)."""
    if config.alignment_weight and backend != "torch":
        raise ValueError(
            f"alignment_weight={config.alignment_weight}: the activation-alignment loss needs backend='torch' "
            f"(the {backend} engine's packed backbone keeps no per-layer hidden states); pass backend='torch' "
            "(command line: --backend torch) or alignment_weight=0"
        )


def layer_count(model, hidden_states) -> int:
    """L, the layers the backbone reports (its hidden-state outputs minus the input embeddings)."""
    if hidden_states is None or len(hidden_states) < 2:
        raise ValueError(
            f"alignment_weight: {type(model).__name__}'s backbone returns no per-layer hidden states with "
            "output_hidden_states=True, which the activation-alignment loss needs"
        )
    return len(hidden_states) - 1


def last_layers(model, hidden_states, layers: int | None) -> tuple[torch.Tensor, ...]:
    """The last N = ``layers`` (None: all L) hidden-state outputs, refusing N > L with the config's name."""
    L = layer_count(model, hidden_states)
    N = L if layers is None else layers
    if N > L:
        raise ValueError(f"alignment_layers={layers} exceeds the {L} layers of {type(model).__name__}")
    return tuple(hidden_states[L + 1 - N :])


def backbone_states(model, inputs_embeds, attention_mask, position_ids, layers: int | None):
    """One backbone forward: (final hidden states [B, T, d], the last N hidden-state outputs [B, T, d] each)."""
    out = hf.backbone(model)(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        output_hidden_states=True,
    )
    last = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return last, last_layers(model, getattr(out, "hidden_states", None), layers)


def text_states(model, embeds: torch.Tensor, mask: torch.Tensor, layers: int | None) -> torch.Tensor:
    """[N, B, S, d] the text run's last N hidden-state outputs of right-padded ``embeds`` [B, S, d] (no
    gradient), zero at padding. ``mask`` [B, S]: real tokens."""
    B, S = mask.shape
    attn = mask.long()
    if hf.is_causal(model):
        # As in reference.write_losses: right padding under causal attention changes no real row, and an
        # all-ones mask avoids NaN rows that a sliding window would give fully masked padding rows.
        attn = torch.ones_like(attn)
    positions = torch.arange(S, device=embeds.device).unsqueeze(0).expand(B, -1)
    with torch.no_grad():
        _, states = backbone_states(model, embeds.detach(), attn, positions, layers)
        stacked = torch.stack(states).detach()
    return torch.where(mask.bool()[None, :, :, None], stacked, torch.zeros_like(stacked))


def targets(model, embeds, mask, layers: int | None, given_tokens: int, weight: float) -> AlignmentTargets:
    """The ``AlignmentTargets`` of a right-padded batch (one no-gradient forward of the text alone)."""
    S = mask.shape[1]
    scored = mask.bool() & (torch.arange(S, device=mask.device) >= given_tokens)
    return AlignmentTargets(text_states(model, embeds, mask, layers), scored, float(weight))


def cosine_distance(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """1 - <h, t> / max(||h|| ||t||, 1e-8) over the last dimension."""
    dot = (h * t).sum(dim=-1)
    norms = h.norm(dim=-1) * t.norm(dim=-1)
    return 1.0 - dot / norms.clamp_min(COSINE_EPS)


def alignment_losses(states, target: AlignmentTargets, math_dtype: torch.dtype) -> torch.Tensor:
    """A [B] (the module docstring's formula) from the memory run's last N hidden-state outputs at the token
    rows, ``states``: N tensors [B, S, d] (row j = token j)."""
    h = torch.stack(states).to(math_dtype)
    t = target.states.to(math_dtype)
    distance = cosine_distance(h, t)  # [N, B, S]
    scored = target.scored
    distance = torch.where(scored, distance, torch.zeros_like(distance))
    count = scored.sum(dim=1).clamp_min(1).to(distance.dtype) * h.shape[0]
    return distance.sum(dim=(0, 2)) / count
