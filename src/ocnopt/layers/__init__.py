"""Per-layer helpers: how a module's Kronecker factors and re-weighted weight gradients are formed.

The registry maps module types to helpers by ``isinstance``; :func:`helper_for` returns ``None``
with a reason for modules that fall back to the diagonal curvature.
"""

from ocnopt.layers.base import LayerHelper, helper_for
from ocnopt.layers.conv2d import Conv2dHelper
from ocnopt.layers.linear import LinearHelper

__all__ = ["LayerHelper", "LinearHelper", "Conv2dHelper", "helper_for"]
