"""Low-rank memories (``WriteConfig.memory_rank = k``): every memory lives in a rank-k affine subspace,

    M_b = mu + z_b U^T              z_b [m, k] per document, U [d, k], mu [d]

and the write optimises the coefficients z_b instead of M_b.

Basis (``WriteConfig.memory_basis``):
    pca      U = q_1..q_k, the top-k principal directions of the input embedding matrix (orthonormal columns,
             signs fixed as in ``init.principal_directions``), mu = the embeddings' mean; fixed.
    learned  U and mu start from the pca basis and are trained: one basis shared by every document in flight,
             one Adam step (betas ``adam_betas``, step size ``basis_lr`` or lr, constant, no clamp, no decay)
             per step of the write on the documents' summed gradient. mu is learned too: the peer
             (progressive_cramming's LowDim trainer) maps z through an ``nn.Linear(k, d)`` with a bias.

Initial coefficients: each initial memory M0_b (whatever ``init`` drew, or the caller's memory: a warm start)
projected onto the subspace, z0_b = (M0_b - mu) pinv(U)^T, which is (M0_b - mu) U while U has orthonormal
columns (always when a write starts). A memory that lies in the subspace (the output of a pca-basis write, or
init="pca" with init_rank <= memory_rank) is reproduced exactly; any other starts from its projection.

One step, with g_M_b = d(sum_b L_b)/dM_b computed by the backend at M_b = mu + z_b U^T (the reference's
autograd, or the engine's fused loss), all at the step's z, U and mu:

    g_z_b = g_M_b U                                       (chain rule)
    z_b  <- the configured update of z_b with g_z_b        (sgd/adam/adamw, clip_value, clip_norm, schedule: the
                                                            per-document ``memory_update`` of a full memory)
    learned: g_U = sum_b a_b g_M_b^T z_b,  g_mu = sum_b a_b sum_i g_M_b[i]      (a_b = 1 for active documents)
             [U | mu] <- Adam([U | mu], [g_U | g_mu])
    M_b  <- mu + z_b U^T  for active documents; an inactive one keeps its memory

Active: the documents that take an update in this step (lr_b > 0). Only cramming has inactive ones: a stopped
document (its memory is final and must stay the one its check scored) and one out of steps; they neither move
nor teach the shared basis. Reported gradient norms are ||g_z_b||, the quantity the update clips and steps.

Decisions (why):
- With a learned basis, documents written together interact through U: a document's result depends on its
  batch (and, in continuous batching, on the stream), unlike a full or pca-basis write. The basis is per call:
  ``reference.write`` / ``engine.write_packed`` start it from the pca basis, and ``cramming.cram`` keeps training
  one basis across its whole stream (documents leave and enter; the basis goes on), so a document entering late
  starts from the projection onto the basis of that moment.
- Outputs hold the full memory M only (shape unchanged). A pca-basis memory is recovered exactly by the
  projection above, so a warm start continues in the same coefficients; a learned basis is not saved, so a warm
  start from it restarts from its projection onto the pca basis (which is why ``capacity`` refuses it: its
  stages warm-start).
- grad_mode "none" only (WriteConfig refuses the others), no CUDA-graph capture (MemoryWriter refuses it): the
  basis state is host-side Python.
"""

import math
import weakref

import torch

from . import hf
from .init import embedding_statistics, principal_directions
from .ops.update import AdamState, memory_update

# id(weight) -> (weakref to it, its version, mu [d], Q [d, d]): the eigendecomposition of the embeddings'
# covariance is the costly part (V d^2 flops), done once per embedding matrix and shared by every rank.
_PCA_CACHE: dict[int, tuple] = {}


def pca_basis(weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu [d], U [d, k]) float64 on the CPU: the mean and the top-k principal directions of the rows of
    ``weight`` [V, d] (``init.embedding_statistics`` / ``init.principal_directions``)."""
    d = weight.shape[1]
    if not 1 <= k <= d:
        raise ValueError(f"memory_rank must be in [1, {d}] (the model's hidden size), got {k}")
    entry = _PCA_CACHE.get(id(weight))
    if entry is None or entry[0]() is not weight or entry[1] != weight._version:
        mu, cov = embedding_statistics(weight)
        _, Q = principal_directions(cov, d)
        entry = (weakref.ref(weight), weight._version, mu, Q)
        _PCA_CACHE[id(weight)] = entry
    return entry[2], entry[3][:, :k]


class LowRankBasis:
    """mu [d] and U [d, k] of a low-rank write (module docstring), with the learned basis's Adam state."""

    def __init__(self, mu: torch.Tensor, U: torch.Tensor, learned: bool, lr: float, betas: tuple[float, float]):
        self.mu, self.U = mu, U
        self.learned, self.lr, self.betas = learned, lr, betas
        self.state: AdamState | None = None
        self.t = 0  # Adam steps the basis has taken

    @classmethod
    def start(cls, config, model, like: torch.Tensor) -> "LowRankBasis":
        """The starting basis of ``config`` for ``model``, in the dtype and on the device of memories ``like``
        (fp32 math for 16-bit ones)."""
        mu, U = pca_basis(hf.input_embeddings(model).weight, config.memory_rank)
        dtype = torch.promote_types(like.dtype, torch.float32)
        lr = config.lr if config.basis_lr is None else config.basis_lr
        learned = config.memory_basis == "learned"
        return cls(mu.to(like.device, dtype), U.to(like.device, dtype), learned, lr, tuple(config.adam_betas))

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def project(self, memory: torch.Tensor) -> torch.Tensor:
        """Coefficients z [B, m, k] of the memories [B, m, d] nearest to ``memory`` in the subspace."""
        centred = memory.to(self.U.dtype) - self.mu
        if self.t == 0:  # the pca basis: orthonormal columns, pinv(U) = U^T
            return centred @ self.U
        return centred @ torch.linalg.pinv(self.U).T

    def memory(self, z: torch.Tensor) -> torch.Tensor:
        """M = mu + z U^T [B, m, d]."""
        return self.mu + z @ self.U.T

    def step(self, z, memory, grad, *, lr, state, step, config, active=None):
        """One step of every document (module docstring). ``z`` [B, m, k] and ``memory`` [B, m, d] the step's
        coefficients and memories (memory = mu + z U^T for active documents), ``grad`` = g_M [B, m, d];
        ``lr``/``step``: as ``memory_update`` takes them (shared or per document); ``state``: the coefficients'
        Adam state; ``active``: [B] bool or None (all). Returns (z, memory, ||g_z|| [B], state)."""
        g_z = grad @ self.U
        result = memory_update(
            z,
            g_z,
            lr=lr,
            optimizer=config.optimizer,
            clip_value=config.effective_clip_value,
            clip_norm=config.clip_norm,
            state=state,
            step=step,
            betas=config.adam_betas,
            weight_decay=config.weight_decay,
        )
        if self.learned:
            self._learn(z, grad, active)
        new = self.memory(result.memory)
        if active is not None:
            new = torch.where(active[:, None, None], new, memory.to(new.dtype))
        return result.memory, new, result.grad_norm, result.state

    def _learn(self, z, grad, active) -> None:
        """One Adam step of [U | mu] on the active documents' summed gradient (at the step's z, U, mu)."""
        if active is not None:  # where, not a product: an inactive row's NaN must not reach the basis
            grad = torch.where(active[:, None, None], grad, torch.zeros_like(grad))
        g_U = torch.einsum("bmd,bmk->dk", grad, z)
        g_mu = grad.sum(dim=(0, 1))
        params = torch.cat([self.U, self.mu[:, None]], dim=1)[None]
        grads = torch.cat([g_U, g_mu[:, None]], dim=1)[None].to(params.dtype)
        result = memory_update(
            params,
            grads,
            lr=self.lr,
            optimizer="adam",
            clip_value=math.inf,
            state=self.state,
            step=self.t + 1,
            betas=self.betas,
        )
        self.t += 1
        self.state = result.state
        self.U, self.mu = result.memory[0, :, : self.rank], result.memory[0, :, self.rank]


def start(config, model, memory: torch.Tensor, memory_input=None):
    """(basis, z0, M0) of a low-rank write from the initial memories ``memory`` [B, m, d]."""
    if memory_input is not None:
        raise ValueError("memory_rank: low-rank memories do not combine with the meta-training memory_input hook")
    basis = LowRankBasis.start(config, model, memory)
    z = basis.project(memory.detach())
    return basis, z, basis.memory(z)
