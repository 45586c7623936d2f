"""Initial memories (``WriteConfig.init``): the shared ``M0`` [m, d] a write starts from when none is given.

Every draw runs on the CPU in float64 from a generator seeded with ``config.seed``, with the embedding
statistics computed there from the model's input embedding matrix E [V, d] (rows e_v), so the same weights
give the same initial memory on every device and backend. z denotes i.i.d. N(0, 1) draws, u i.i.d. U[0, 1)
draws, s = ``init_std``:

    normal          M_ij = s z_ij                                  (the default; unchanged numbers)
    uniform         M_ij = s sqrt(3) (2 u_ij - 1)                  (U[-s sqrt 3, s sqrt 3): variance s^2)
    embedding-diag  M_ij = mu_j + sigma_j z_ij                     a normal fitted per coordinate
    embedding-full  M_i  = mu + L z_i,  L L^T = C                  a normal fitted with full covariance
    pca             M_i  = mu + sum_{r<k} sqrt(lambda_r) z_ir q_r   the top-k principal directions

with mu = (1/V) sum_v e_v, C = (1/(V-1)) sum_v (e_v - mu)(e_v - mu)^T (sigma_j^2 = C_jj), L the Cholesky
factor of C (of C + eps I with the smallest eps = 1e-10 * mean(diag C) * 10^t that makes it positive definite
when C is singular, e.g. when V <= d), and (lambda_r, q_r) the eigenpairs of C in decreasing order, each q_r's
sign fixed so that its entry of largest magnitude is positive (an eigenvector's sign is otherwise arbitrary
and would change the draw). k = ``init_rank`` (None: min(d, 16)). The embedding-based draws ignore s: their
scale is the embeddings'.

Why these: the cramming papers' reference code offers them; a memory drawn like the embeddings starts where
the model is used to inputs, and a PCA draw starts in the embeddings' dominant subspace.

Warm start from a previous output (per document) is not a shared draw: the command line passes each
document's earlier memory (``gradmem-fast write --init warm --init-from OUTPUT``).
"""

import torch

from . import hf
from .config import INITS  # one list, checked by WriteConfig

DEFAULT_PCA_RANK = 16
_CHUNK = 8192  # embedding rows per pass of the statistics (a [V, d] float64 copy is never made)


def embedding_statistics(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu [d], C [d, d]) of the rows of ``weight`` [V, d] in float64 on the CPU (formulas above): two passes
    over row chunks, the second centred on mu (no cancellation of a large mean)."""
    V, d = weight.shape
    if V < 2:
        raise ValueError(f"the input embedding matrix needs at least 2 rows for its statistics, got {V}")
    total = torch.zeros(d, dtype=torch.float64)
    for start in range(0, V, _CHUNK):
        total += weight[start : start + _CHUNK].detach().to("cpu", torch.float64).sum(0)
    mu = total / V
    cov = torch.zeros(d, d, dtype=torch.float64)
    for start in range(0, V, _CHUNK):
        x = weight[start : start + _CHUNK].detach().to("cpu", torch.float64) - mu
        cov += x.T @ x
    return mu, cov / (V - 1)


def _cholesky(cov: torch.Tensor) -> torch.Tensor:
    """L with L L^T = C, adding the smallest jitter of the ladder above that makes C positive definite."""
    L, info = torch.linalg.cholesky_ex(cov)
    if int(info) == 0:
        return L
    scale = float(cov.diagonal().mean()) or 1.0
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    for t in range(12):
        L, info = torch.linalg.cholesky_ex(cov + (1e-10 * scale * 10**t) * eye)
        if int(info) == 0:
            return L
    raise ValueError("the covariance of the input embeddings is not positive semi-definite")


def principal_directions(cov: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lambda [k], Q [d, k]): the top-k eigenpairs of C, decreasing, each column's largest entry positive."""
    values, vectors = torch.linalg.eigh(cov)
    values, vectors = values.flip(0)[:k].clamp_min(0.0), vectors.flip(1)[:, :k]
    pivot = vectors.abs().argmax(0)
    signs = torch.sign(vectors[pivot, torch.arange(k)])
    return values, vectors * torch.where(signs == 0, torch.ones_like(signs), signs)


def draw(
    kind: str, m: int, d: int, std: float, seed: int, embedding: torch.Tensor | None = None, rank: int | None = None
) -> torch.Tensor:
    """[m, d] float64 CPU initial memory of ``kind`` (module docstring); ``embedding`` [V, d] is needed by
    the embedding-based kinds."""
    if kind not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {kind!r}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "normal":
        return torch.randn(m, d, generator=gen, dtype=torch.float64) * std
    if kind == "uniform":
        return (torch.rand(m, d, generator=gen, dtype=torch.float64) * 2 - 1) * (std * 3**0.5)
    if embedding is None or embedding.dim() != 2 or embedding.shape[1] != d:
        raise ValueError(f"init={kind!r} needs the input embedding matrix [V, {d}]")
    mu, cov = embedding_statistics(embedding)
    if kind == "embedding-diag":
        return mu + cov.diagonal().sqrt() * torch.randn(m, d, generator=gen, dtype=torch.float64)
    if kind == "embedding-full":
        return mu + torch.randn(m, d, generator=gen, dtype=torch.float64) @ _cholesky(cov).T
    k = min(d, DEFAULT_PCA_RANK) if rank is None else rank
    if not 1 <= k <= d:
        raise ValueError(f"init_rank must be in [1, {d}] (the hidden size), got {k}")
    values, vectors = principal_directions(cov, k)
    return mu + (torch.randn(m, k, generator=gen, dtype=torch.float64) * values.sqrt()) @ vectors.T


def initial_memory(config, model) -> torch.Tensor:
    """The config's shared initial memory [m, d] (float64, CPU) for ``model``."""
    d = hf.hidden_size(model)
    embedding = None
    if config.init not in ("normal", "uniform"):
        embedding = hf.input_embeddings(model).weight
    return draw(config.init, config.num_memory_tokens, d, config.init_std, config.seed, embedding, config.init_rank)
