"""The feedback policy: per-sample weights of the closed-loop direction (pure functions)."""

from ocnopt.feedback.policy import feedback_terms, momentum_gain_correction, sample_weights

__all__ = ["feedback_terms", "momentum_gain_correction", "sample_weights"]
