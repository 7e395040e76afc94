"""Neural ODEs (SNOpt): adjoint-solved ODE blocks, time-integrated Kronecker factors collected
during the adjoint solve (O(1) memory), and the integration time ``t1`` as a control.

Needs the optional dependency torchdiffeq (``pip install 'ocnopt[ode]'``).
"""

from ocnopt.ode.block import ODEBlock, State, find_ode_blocks
from ocnopt.ode.collector import ODEFactorCollector, ODEFactors, ODELayer, ode_layers
from ocnopt.ode.layers import ConcatConv2d, ConcatLinear, ConcatSquashLinear
from ocnopt.ode.precond import SNOptPreconditioner
from ocnopt.ode.t1 import T1_MODES, IntegrationTimeController

__all__ = [
    "ConcatConv2d",
    "ConcatLinear",
    "ConcatSquashLinear",
    "IntegrationTimeController",
    "ODEBlock",
    "ODEFactorCollector",
    "ODEFactors",
    "ODELayer",
    "SNOptPreconditioner",
    "State",
    "T1_MODES",
    "find_ode_blocks",
    "ode_layers",
]
