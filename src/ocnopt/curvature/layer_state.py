"""Per-layer Kronecker curvature state (KFAC, EKFAC) as pure functions on a state mapping.

A layer's state lives in the optimizer's per-parameter state of its weight, under the keys

=================================  ==========================================================
``A`` ``(d_in[+1], d_in[+1])``     EMA of the input factor ``E[a a^T]`` (ones column for a bias)
``G`` ``(d_out, d_out)``           EMA of the output factor ``E[(B g)(B g)^T]``
``{in,out}_{vectors,values,rest}``  :class:`~ocnopt.curvature.kronecker.Eigenbasis` of A and G
``m2`` ``(k_o[+1], k_i[+1])``      EKFAC's running second moments in the eigenbasis
``batch_size``, ``locations``      B and the output locations per sample of the last update
``kron_step``                      applied steps of this layer (drives the refresh schedule)
=================================  ==========================================================

Nothing here mutates its input: each function returns the NEW entries, which the optimizer
stages in its step transaction (so a failed step leaves the curvature untouched).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ocnopt.curvature.kronecker import (
    Eigenbasis,
    Projection,
    ekfac_init,
    kfac_scale,
    refresh_eigenbasis,
)

__all__ = ["KroneckerCurvature", "KFAC", "EKFAC", "KRONECKER", "STATE_KEYS", "BASIS_KEYS",
           "refresh_due"]

#: The entries of a refresh that are eigenbases (what one rank computes and broadcasts).
BASIS_KEYS = ("in_vectors", "in_values", "in_rest", "out_vectors", "out_values", "out_rest")
STATE_KEYS = frozenset({
    "A", "G", "in_vectors", "in_values", "in_rest", "out_vectors", "out_values", "out_rest",
    "m2", "batch_size", "locations", "kron_step"})


def refresh_due(step: int, update_freq: int, refreshed: bool, early: bool = True) -> bool:
    """Whether the eigenbases are recomputed at layer step ``step`` (applied steps so far).

    Always at the first statistics, then every ``update_freq`` steps. With ``early`` also at
    steps 1, 2, 4, 8, ... below ``update_freq``: the first batches' factors are noisy and
    change fast, and a short run should not precondition with the first batch's basis for
    ``update_freq`` steps (the extra refreshes cost ``log2(update_freq)`` decompositions once).
    """
    if not refreshed or step % update_freq == 0:
        return True
    return early and step < update_freq and step & (step - 1) == 0


def bases(st: Mapping[str, Any], d_out: int, d_in: int, like: Tensor) -> tuple[Eigenbasis,
                                                                             Eigenbasis]:
    """The (output, input) eigenbases; trivial (damping-only) bases before the first refresh."""
    if "in_vectors" not in st:
        return Eigenbasis.identity(d_out, like), Eigenbasis.identity(d_in, like)
    return (Eigenbasis(st["out_vectors"], st["out_values"], st["out_rest"]),
            Eigenbasis(st["in_vectors"], st["in_values"], st["in_rest"]))


@dataclass(frozen=True)
class KroneckerCurvature:
    """KFAC: ``M = L * A (x) G + damping``, applied in the factors' eigenbases."""

    name: str = "kfac"

    # ------------------------------------------------------------------ statistics
    @staticmethod
    def factor_entries(
        st: Mapping[str, Any], fa: Tensor, fg: Tensor, rows: int, batch: int, calls: int,
        decay: float,
    ) -> dict[str, Any]:
        """New EMA factors from one minibatch's factors ``fa`` ``(d_in[+1], d_in[+1])`` and
        ``fg`` ``(d_out, d_out)``, estimated from ``rows`` rows of ``calls`` calls on ``batch``
        samples (so ``rows / (batch * calls)`` output locations per sample)."""
        if "A" in st:
            fa = st["A"].mul(decay).add_(fa, alpha=1 - decay)
            fg = st["G"].mul(decay).add_(fg, alpha=1 - decay)
        return {"A": fa, "G": fg, "batch_size": batch, "locations": rows / (batch * calls)}

    def refresh_entries(
        self, st: Mapping[str, Any], max_rank: int | None
    ) -> tuple[dict[str, Any], list[str]]:
        """New eigenbases of ``st["A"]``, ``st["G"]`` and what derives from them; also the names
        of the factors whose decomposition failed (their last good basis, or the trivial one, is
        kept)."""
        new, failed = self.eigenbases(st, max_rank)
        return self.from_bases(st, new), failed

    def from_bases(self, st: Mapping[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        """The refresh's state entries given its new bases ``BASIS_KEYS`` (KFAC: the bases)."""
        return new

    @staticmethod
    def eigenbases(
        st: Mapping[str, Any], max_rank: int | None
    ) -> tuple[dict[str, Any], list[str]]:
        """The ``BASIS_KEYS`` entries of fresh eigenbases of ``st["A"]``, ``st["G"]``, and the
        factors whose decomposition failed."""
        new: dict[str, Any] = {}
        failed: list[str] = []
        for side, f in (("in", st["A"]), ("out", st["G"])):
            prev = None
            if f"{side}_vectors" in st:
                prev = Eigenbasis(st[f"{side}_vectors"], st[f"{side}_values"], st[f"{side}_rest"])
            basis = refresh_eigenbasis(f, max_rank, prev)
            if basis is None:
                failed.append(f"{side}put")
                basis = prev if prev is not None else Eigenbasis.identity(f.shape[0], f)
            new[f"{side}_vectors"], new[f"{side}_values"], new[f"{side}_rest"] = (
                basis.vectors, basis.values, basis.rest)
        return new, failed

    # ------------------------------------------------------------------ preconditioning
    def inverse_scale(self, st: Mapping[str, Any], group: Mapping[str, Any], out: Eigenbasis,
                      inp: Eigenbasis) -> Tensor:
        """Block scale of ``M^-1`` in the bases ``(out, inp)`` as the state stands (EKFAC: before
        this step's second-moment update)."""
        return kfac_scale(out, inp, st.get("locations", 1.0), group["damping"])

    def precondition(
        self, st: Mapping[str, Any], v: Tensor, group: Mapping[str, Any]
    ) -> tuple[Tensor, dict[str, Any]]:
        """``M^-1 v`` for a direction matrix ``v`` ``(d_out, d_in[+1])``, and new state."""
        out, inp = bases(st, v.shape[0], v.shape[1], v)
        proj = Projection(v, out, inp)
        return proj.apply(self.inverse_scale(st, group, out, inp)), {}


@dataclass(frozen=True)
class EKFAC(KroneckerCurvature):
    """EKFAC with running-average eigenvalues (SNOpt): the Kronecker eigenbasis, and per
    eigen-direction an EMA (decay ``eigenvalue_decay``) of ``B * (projected direction)^2``,
    reset to the Kronecker eigenvalues at every refresh."""

    name: str = "ekfac"

    def from_bases(self, st: Mapping[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        """The bases, and EKFAC's second moments restarted at the Kronecker eigenvalues."""
        out, inp = bases(new, 0, 0, st["A"])
        return {**new, "m2": ekfac_init(out, inp, st["locations"])}

    @staticmethod
    def _moments(st: Mapping[str, Any], out: Eigenbasis, inp: Eigenbasis) -> Tensor:
        m2 = st.get("m2")
        return ekfac_init(out, inp, st.get("locations", 1.0)) if m2 is None else m2

    def inverse_scale(self, st: Mapping[str, Any], group: Mapping[str, Any], out: Eigenbasis,
                      inp: Eigenbasis) -> Tensor:
        return (self._moments(st, out, inp) + group["damping"]).reciprocal_()

    def precondition(
        self, st: Mapping[str, Any], v: Tensor, group: Mapping[str, Any]
    ) -> tuple[Tensor, dict[str, Any]]:
        out, inp = bases(st, v.shape[0], v.shape[1], v)
        proj = Projection(v, out, inp)
        m2 = self._moments(st, out, inp)
        alpha = group["eigenvalue_decay"]
        m2 = m2.mul(alpha).add_(proj.second_moments(), alpha=(1 - alpha) * st.get("batch_size", 1))
        return proj.apply((m2 + group["damping"]).reciprocal_()), {"m2": m2}


KFAC = KroneckerCurvature()
KRONECKER: dict[str, KroneckerCurvature] = {"kfac": KFAC, "ekfac": EKFAC()}
