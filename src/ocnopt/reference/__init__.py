"""Exact float64 reference implementation of DDP on tiny sequential networks.

Brute force (explicit Jacobians / Hessians), slow, readable.  It is the test oracle of the
fast optimizers and the "vanilla DDP" baseline of the tiny-net benchmark.  ``game`` extends it to
non-Markovian networks (augmented-state DDP; ``game_nets`` holds tiny residual / branching nets).

``reference.ode`` holds the Neural-ODE oracles (fixed-grid adjoint factor sampling, dense EKFAC).

Sign convention (algorithm.md §1): du* = -(k + K dx) with k = Q_uu^{-1} Q_u, K = Q_uu^{-1} Q_ux.
"""

from .ddp import (
    Policy,
    QTerms,
    VanillaDDP,
    closed_loop_gn_step,
    ddp_backward,
    ddp_forward_update,
    ddp_step,
    first_order_dp,
    per_sample_value_gradients,
    q_terms,
    regularized_curvature,
    stage_jacobians,
    tensor_terms,
)
from .game import (
    INFORMATION,
    AugmentedGame,
    Component,
    Op,
    Program,
    StagePolicy,
    game_step,
    sequential_program,
)
from .game_nets import ResidualMLP, TinyResCNN, TwoBranchNet
from .model import (
    LossSpec,
    Stage,
    batch_objective,
    loss_derivatives,
    per_sample_loss,
    preprocess,
    stages,
    trajectory,
)
from .ode import (
    FIXED_METHODS,
    OracleFactors,
    adjoint_factor_oracle,
    dense_ekfac_direction,
    fixed_grid,
    solve_fixed,
)

__all__ = [
    "FIXED_METHODS",
    "OracleFactors",
    "adjoint_factor_oracle",
    "dense_ekfac_direction",
    "fixed_grid",
    "solve_fixed",
    "INFORMATION",
    "AugmentedGame",
    "Component",
    "LossSpec",
    "Op",
    "Program",
    "ResidualMLP",
    "StagePolicy",
    "TinyResCNN",
    "TwoBranchNet",
    "game_step",
    "sequential_program",
    "Policy",
    "QTerms",
    "Stage",
    "VanillaDDP",
    "batch_objective",
    "closed_loop_gn_step",
    "ddp_backward",
    "ddp_forward_update",
    "ddp_step",
    "first_order_dp",
    "loss_derivatives",
    "per_sample_loss",
    "per_sample_value_gradients",
    "preprocess",
    "q_terms",
    "regularized_curvature",
    "stage_jacobians",
    "stages",
    "tensor_terms",
    "trajectory",
]
