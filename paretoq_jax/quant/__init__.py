"""ParetoQ quantizers: pure JAX ops with straight-through gradients, integer codes, packing.

Public API (used by the rest of the project): ``fake_quant``, ``init_scale``, ``to_codes``,
``from_codes``, ``effective_scale``, ``resolve``, ``parse_bits``, ``QuantSpec``, ``pack``,
``unpack``. See ``docs/quantizers.md``.
"""

from .ops import (
    SCALE_INITS,
    effective_scale,
    export_codes,
    fake_quant,
    fake_quant_vjp,
    from_codes,
    init_scale,
    mse_scale,
    to_codes,
    train_codes,
)
from .packed_linear import packed_matmul
from .packing import LAYOUT_VERSION, PackFormat, pack, pack_format, packed_shape, unpack
from .spec import (
    CLIP,
    DEFAULT_METHOD,
    METHODS,
    SCALE_EPS,
    VALID_BITS,
    QuantSpec,
    parse_bits,
    resolve,
)

__all__ = [
    "LAYOUT_VERSION",
    "PackFormat",
    "pack",
    "pack_format",
    "packed_matmul",
    "packed_shape",
    "unpack",
    "CLIP",
    "DEFAULT_METHOD",
    "METHODS",
    "SCALE_EPS",
    "VALID_BITS",
    "QuantSpec",
    "effective_scale",
    "fake_quant",
    "fake_quant_vjp",
    "from_codes",
    "init_scale",
    "mse_scale",
    "SCALE_INITS",
    "parse_bits",
    "export_codes",
    "resolve",
    "to_codes",
    "train_codes",
]
