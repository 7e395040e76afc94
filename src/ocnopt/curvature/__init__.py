"""Curvature algebra (pure functions): Kronecker factors, eigenbases, preconditioning."""

from ocnopt.curvature.kronecker import (
    Eigenbasis,
    Projection,
    ekfac_init,
    kfac_scale,
    refresh_eigenbasis,
    rows_factor,
    symmetric_eigh,
)

__all__ = ["Eigenbasis", "Projection", "ekfac_init", "kfac_scale", "refresh_eigenbasis",
           "rows_factor", "symmetric_eigh"]
