"""Weight-only quantisation by module swap: quantize(model, scheme) replaces every projection with an int8
(W8A16) or int4 (W4A16) layer of the same forward; the layers quantise each tensor as it loads."""

from gpu_worker.quant.embedding import Int8Embedding
from gpu_worker.quant.layers import Int4Linear, Int8Linear, QuantLinear
from gpu_worker.quant.schemes import AUTO, SCHEMES, QuantScheme, parse_scheme
from gpu_worker.quant.swap import load_quantized_from, quantize, quantize_embedding

__all__ = [
    "AUTO",
    "SCHEMES",
    "Int4Linear",
    "Int8Embedding",
    "Int8Linear",
    "QuantLinear",
    "QuantScheme",
    "load_quantized_from",
    "parse_scheme",
    "quantize",
    "quantize_embedding",
]
