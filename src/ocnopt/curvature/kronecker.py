"""Kronecker-factored curvature algebra (KFAC / EKFAC), as pure functions.

A layer's curvature block is ``M = L * A (x) G`` with ``A = E[a a^T]`` (input rows, ones column for
the bias), ``G = E[g g^T]`` (per-sample output gradients) and ``L`` the number of locations
(1 for Linear; output pixels for Conv2d, KFC). Directions are ``(d_out, d_in)`` matrices ``V``
with ``vec(V)`` in the ``A (x) G`` ordering, so ``M^-1 vec(V) = vec(G^-1 V A^-1)``.

Each factor is represented by an :class:`Eigenbasis`: the top-``k`` eigenpairs plus one
isotropic eigenvalue (the mean of the discarded spectrum) for the orthogonal complement. With
``k = d`` (``max_rank=None``) this is the exact eigendecomposition. The truncated form turns the
two dense ``d x d`` rotations of a step into four ``d x k`` products, and its refresh is a
warm-started subspace iteration instead of a full ``eigh`` (see :func:`refresh_eigenbasis`).

In a (possibly truncated) basis pair, a direction splits into blocks: core ``(k_o, k_i)``,
top-output x complement-input (one value per output eigenvector), complement-output x top-input,
and complement x complement. Every block gets one scale (per entry in the core, per row/column in
the mixed blocks, one scalar for the last); :class:`Projection` computes the block second
moments (EKFAC statistics) and applies such a block scale without forming the complements.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Eigenbasis",
    "Projection",
    "symmetric_eigh",
    "refresh_eigenbasis",
    "kfac_scale",
    "ekfac_init",
]

log = logging.getLogger(__name__)


@dataclass
class Eigenbasis:
    """Top-``k`` eigenpairs of a symmetric PSD ``(d, d)`` factor, with an isotropic remainder.

    ``vectors``: ``(d, k)`` orthonormal columns, eigenvalues descending; ``values``: ``(k,)``;
    ``rest``: 0-dim tensor, the mean eigenvalue of the ``d - k`` discarded directions (0 if k = d).
    """

    vectors: Tensor
    values: Tensor
    rest: Tensor

    @property
    def dim(self) -> int:
        return self.vectors.shape[0]

    @property
    def rank(self) -> int:
        return self.vectors.shape[1]

    @property
    def truncated(self) -> bool:
        return self.rank < self.dim

    def spectrum(self) -> Tensor:
        """``(k [+1],)``: kept eigenvalues, then the remainder eigenvalue if truncated."""
        if self.truncated:
            return torch.cat([self.values, self.rest.reshape(1)])
        return self.values

    @staticmethod
    def identity(d: int, like: Tensor) -> Eigenbasis:
        """The trivial basis (all eigenvalues 0): preconditioning reduces to damping only."""
        eye = torch.eye(d, dtype=like.dtype, device=like.device)
        return Eigenbasis(eye, like.new_zeros(d), like.new_zeros(()))


def symmetric_eigh(f: Tensor) -> tuple[Tensor, Tensor] | None:
    """Robust ``eigh`` of a symmetric matrix: eigenvalues descending (clamped >= 0), vectors.

    Tries the factor's dtype, then float64 with a small diagonal jitter. Returns ``None`` if the
    input is not finite or both attempts fail (the caller keeps its last good basis).
    """
    if not bool(torch.isfinite(f).all()):
        return None
    d = f.shape[0]
    for attempt, dtype in enumerate((f.dtype, torch.float64)):
        m = f.to(dtype)
        if attempt:
            jitter = 1e-7 * (m.diagonal().abs().mean() + 1e-30)
            m = m + jitter * torch.eye(d, dtype=dtype, device=f.device)
        try:
            vals, vecs = torch.linalg.eigh(m)
        except RuntimeError as err:  # torch.linalg.LinAlgError subclasses RuntimeError
            log.debug("eigh failed in %s: %s", dtype, err)
            continue
        if bool(torch.isfinite(vals).all()) and bool(torch.isfinite(vecs).all()):
            return vals.flip(0).clamp_min(0).to(f.dtype), vecs.flip(1).to(f.dtype)
    return None


def refresh_eigenbasis(
    f: Tensor, max_rank: int | None, previous: Eigenbasis | None = None, power_iters: int = 1
) -> Eigenbasis | None:
    """New :class:`Eigenbasis` of factor ``f`` ``(d, d)``; ``None`` if the decomposition failed.

    ``max_rank=None`` or ``>= d``: exact full ``eigh``. Otherwise the top ``max_rank`` pairs:
    from a full ``eigh`` the first time, afterwards by ``power_iters`` steps of subspace
    iteration warm-started at ``previous`` plus a Rayleigh-Ritz ``eigh`` of size ``k`` (cost
    ``O(d^2 k)`` instead of ``O(d^3)``). The remainder eigenvalue is ``(tr f - sum kept)/(d - k)``.
    """
    d = f.shape[0]
    if max_rank is None or max_rank >= d:
        res = symmetric_eigh(f)
        if res is None:
            return None
        vals, vecs = res
        return Eigenbasis(vecs, vals, vals.new_zeros(()))
    k = max_rank
    trace = f.diagonal().sum()
    if previous is not None and previous.rank == k and previous.dim == d:
        q = previous.vectors
        for _ in range(power_iters):
            q = torch.linalg.qr(f.mm(q)).Q
        res = symmetric_eigh(q.t().mm(f.mm(q)))
        if res is not None and bool(torch.isfinite(q).all()):
            vals, rot = res
            rest = ((trace - vals.sum()) / (d - k)).clamp_min(0)
            return Eigenbasis(q.mm(rot), vals, rest)
        log.debug("warm-started refresh failed; falling back to a full eigh")
    full = symmetric_eigh(f)
    if full is None:
        return None
    vals, vecs = full
    rest = ((trace - vals[:k].sum()) / (d - k)).clamp_min(0)
    return Eigenbasis(vecs[:, :k].contiguous(), vals[:k].contiguous(), rest)


def kfac_scale(out: Eigenbasis, inp: Eigenbasis, locations: float, damping: float) -> Tensor:
    """Block scale of KFAC, ``1 / (L * lambda_out lambda_in^T + damping)``.

    Shape ``(k_o [+1], k_i [+1])``.
    """
    return torch.outer(out.spectrum(), inp.spectrum()).mul_(locations).add_(damping).reciprocal_()


def ekfac_init(out: Eigenbasis, inp: Eigenbasis, locations: float) -> Tensor:
    """Initial EKFAC second moments after a refresh: the Kronecker eigenvalues ``L * l_o l_i^T``."""
    return torch.outer(out.spectrum(), inp.spectrum()).mul_(locations)


@functools.lru_cache(maxsize=64)
def _block_helpers(ko: int, ki: int, d_out: int, d_in: int, tr_out: bool, tr_in: bool,
                   dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Difference operators ``D_out`` ``(k_o+r_o, k_o+r_o)``, ``D_in`` and 1/entries per block.

    ``D = [[I, 0], [-1^T, 1]]`` turns "sum over the whole row/column" into "sum over the
    complement": block sums of squares are ``D_out S D_in^T`` for the cumulative matrix ``S``.
    """

    def diff(k: int, tr: bool) -> Tensor:
        d = torch.eye(k + int(tr), dtype=dtype, device=device)
        if tr:
            d[k, :k] = -1
        return d

    inv = torch.ones(ko + int(tr_out), ki + int(tr_in), dtype=dtype, device=device)
    if tr_in:
        inv[:, ki] /= d_in - ki
    if tr_out:
        inv[ko, :] /= d_out - ko
    return diff(ko, tr_out), diff(ki, tr_in), inv


class Projection:
    """A direction ``V`` ``(d_out, d_in)`` expressed in an (out, in) eigenbasis pair.

    Costs ``O((k_o + k_i) d_out d_in)`` multiply-adds to build and the same to :meth:`apply`
    (``k`` = kept rank; ``k = d`` for an exact side), in a few dozen tensor operations.
    """

    def __init__(self, v: Tensor, out: Eigenbasis, inp: Eigenbasis) -> None:
        self.v = v
        self.u, self.w = out.vectors, inp.vectors
        self.tr_out, self.tr_in = out.truncated, inp.truncated
        self.x = self.u.t().mm(v)  # (k_o, d_in)
        self.c = self.x.mm(self.w)  # (k_o, k_i)
        self.vw = v.mm(self.w) if self.tr_out else None  # (d_out, k_i)

    def second_moments(self) -> Tensor:
        """Mean squared entry of every block, shape ``(k_o [+1], k_i [+1])`` like the scale."""
        c2 = self.c.square()
        if not (self.tr_out or self.tr_in):
            return c2
        ko, ki = c2.shape
        d_out, d_in = self.v.shape
        d_o, d_i, inv = _block_helpers(ko, ki, d_out, d_in, self.tr_out, self.tr_in, c2.dtype,
                                       c2.device)
        s = c2  # cumulative sums of squares: whole rows / columns in the last row / column
        if self.tr_in:
            s = torch.cat([s, self.x.square().sum(1, keepdim=True)], 1)
        if self.tr_out:
            last = self.vw.square().sum(0)
            if self.tr_in:
                flat = self.v.reshape(-1)
                last = torch.cat([last, torch.dot(flat, flat).reshape(1)])
            s = torch.cat([s, last.unsqueeze(0)], 0)
        return d_o.mm(s).mm(d_i.t()).clamp_min_(0).mul_(inv)

    def apply(self, scale: Tensor) -> Tensor:
        """``(d_out, d_in)`` result of scaling every block entry by ``scale`` and rotating back."""
        ko, ki = self.c.shape
        u, w, c, x = self.u, self.w, self.c, self.x
        if not (self.tr_out or self.tr_in):
            return u.mm(c * scale).mm(w.t())
        if not self.tr_out:  # truncated input side only: per-row complement scale a
            a = scale[:, ki : ki + 1]
            return u.mm(torch.addmm(x * a, c * (scale[:, :ki] - a), w.t()))
        if not self.tr_in:  # truncated output side only: per-column complement scale b
            b = scale[ko : ko + 1, :]
            return torch.addmm(self.vw * b, u, c * (scale[:ko] - b)).mm(w.t())
        s_rr = scale[ko, ki]
        a = scale[:ko, ki : ki + 1] - s_rr
        b = scale[ko : ko + 1, :ki] - s_rr
        out = u.mm(torch.addmm(x * a, c * (scale[:ko, :ki] - a - b - s_rr), w.t()))
        # out of place (same kernels): torch.func.vmap batches these over per-sample directions
        return torch.addcmul(torch.addmm(out, self.vw * b, w.t()), self.v, s_rr)
