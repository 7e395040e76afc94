"""Curvature: Kronecker algebra (pure functions) and per-layer Kronecker curvature state."""

from ocnopt.curvature.kronecker import (
    Eigenbasis,
    Projection,
    ekfac_init,
    kfac_scale,
    refresh_eigenbasis,
    symmetric_eigh,
)
from ocnopt.curvature.layer_state import KRONECKER, KroneckerCurvature, refresh_due

__all__ = ["KRONECKER", "Eigenbasis", "KroneckerCurvature", "Projection", "ekfac_init",
           "kfac_scale", "refresh_due", "refresh_eigenbasis", "symmetric_eigh"]
