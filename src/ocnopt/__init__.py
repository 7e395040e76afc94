"""ocnopt: optimal-control-theoretic second-order training for PyTorch."""

__version__ = "0.1.0"
