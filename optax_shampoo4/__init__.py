"""4-bit Shampoo for JAX and Optax.

A composable :class:`optax.GradientTransformation` whose preconditioner state
is stored as 4-bit quantized eigenvector matrices (Wang et al., NeurIPS 2024).
"""

from optax_shampoo4 import (
    factors,
    grafting,
    launch,
    linalg,
    moment_storage,
    moments,
    options,
    partition,
    quantization,
    roots,
    sharding,
    state_utils,
)
from optax_shampoo4.alias import adagrad_shampoo4, adamw_shampoo4, sgdm_shampoo4
from optax_shampoo4.factors import EigenFactors, MatrixFactors
from optax_shampoo4.quantization import OffDiagQuantized, QuantizedArray, SplitRowsQuantized
from optax_shampoo4.reference_aliases import distributed_shampoo4, soap4
from optax_shampoo4.shampoo import ScaleByShampoo4State, scale_by_shampoo4
from optax_shampoo4.soap import ScaleBySoap4State, scale_by_soap4
from optax_shampoo4.state_utils import convert_state, state_nbytes, state_sharding

__version__ = "0.1.0"

__all__ = [
    "EigenFactors",
    "MatrixFactors",
    "OffDiagQuantized",
    "QuantizedArray",
    "ScaleByShampoo4State",
    "ScaleBySoap4State",
    "SplitRowsQuantized",
    "adagrad_shampoo4",
    "adamw_shampoo4",
    "convert_state",
    "distributed_shampoo4",
    "factors",
    "grafting",
    "launch",
    "linalg",
    "moment_storage",
    "moments",
    "options",
    "partition",
    "quantization",
    "roots",
    "scale_by_shampoo4",
    "scale_by_soap4",
    "sharding",
    "sgdm_shampoo4",
    "soap4",
    "state_utils",
    "state_sharding",
    "state_nbytes",
]
