"""Optimizers: :class:`OCNOpt` and the functional per-tensor kernels it is built on."""

from ocnopt.optim.ocnopt import CURVATURES, OCNOpt

__all__ = ["OCNOpt", "CURVATURES"]
