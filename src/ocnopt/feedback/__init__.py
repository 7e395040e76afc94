"""The feedback policy: per-sample weights of the closed-loop direction (pure functions), and
game-theoretic (DGNOpt) feedback: structure of non-Markovian networks from the autograd graph,
single-backward partial gradients of cut tensors, cooperative stage solves."""

from ocnopt.feedback.cooperative import (
    Member,
    StepModel,
    cooperative_weights,
    joint_weights,
    output_inner,
    per_sample_grads,
    per_sample_gram,
    step_model,
    update_effect,
)
from ocnopt.feedback.game import GameFeedback
from ocnopt.feedback.policy import feedback_terms, momentum_gain_correction, sample_weights
from ocnopt.feedback.record import Observer, Recorder
from ocnopt.feedback.structure import (
    INFORMATION,
    CutTerm,
    GamePlan,
    ModuleCall,
    PlayerPlan,
    Seen,
    analyse,
    edge_of,
)

__all__ = [
    "INFORMATION",
    "CutTerm",
    "GameFeedback",
    "GamePlan",
    "Member",
    "ModuleCall",
    "Observer",
    "PlayerPlan",
    "Recorder",
    "Seen",
    "StepModel",
    "analyse",
    "cooperative_weights",
    "edge_of",
    "feedback_terms",
    "joint_weights",
    "momentum_gain_correction",
    "output_inner",
    "per_sample_grads",
    "per_sample_gram",
    "sample_weights",
    "step_model",
    "update_effect",
]
