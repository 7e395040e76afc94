"""ocnopt: optimal-control-theoretic second-order training for PyTorch.

>>> opt = ocnopt.OCNOpt(model, lr=0.05, curvature="ekfac", feedback=True)
>>> loss = opt.step(lambda: loss_fn(model(x), y))   # closure WITHOUT backward()
"""

from ocnopt.optim import CURVATURES, OCNOpt

__version__ = "0.1.0"
__all__ = ["OCNOpt", "CURVATURES", "__version__"]
