"""The quantisation schemes by name (`--quantization`), parsed once before anything is loaded."""

from __future__ import annotations

from dataclasses import dataclass

from gpu_worker.errors import ModelLoadError

INT4_GROUPS = (32, 64, 128, 256)  # powers of two: what the Triton GEMV and torch's CPU int4 matmul take
DEFAULT_INT4_GROUP = 128
BNB_SCHEMES = ("bnb-int8", "bnb-nf4")
# "auto": a file's weights as they are stored: a GGUF whose projections are all Q8_0, or all Q4_0/Q4_1, runs
# them in Ruvon's int8 / int4 g32 layout (no dequantising, nothing rounded again); anything else runs unquantised.
AUTO = "auto"
SCHEMES = (AUTO, "none", "int8", "int4", *(f"int4-g{g}" for g in INT4_GROUPS), *BNB_SCHEMES)
BNB_INSTALL = "pip install bitsandbytes==0.50.2"
BNB_NF4_BLOCK = 64  # bitsandbytes' default NF4 block (one absmax per 64 weights of the flattened matrix)


@dataclass(frozen=True)
class QuantScheme:
    """A weight-only scheme: 8-bit symmetric or 4-bit asymmetric, in groups of group_size along K.

    group_size None means one scale per output channel (int8 from full precision); GGUF Q8_0 weights load
    as int8 with group_size 32, their own block. library "bnb": bitsandbytes' LLM.int8 (bits 8) or NF4
    (bits 4) layers instead of Ruvon's own.
    """

    bits: int
    group_size: int | None
    library: str = "ruvon"

    def describe(self) -> str:
        """Return e.g. "int8 per-channel", "int4 g128", "bnb nf4 b64"."""
        if self.library == "bnb":
            return "bnb int8 per-channel (LLM.int8)" if self.bits == 8 else f"bnb nf4 b{self.group_size}"
        return f"int{self.bits} " + ("per-channel" if self.group_size is None else f"g{self.group_size}")


def parse_scheme(name: str) -> QuantScheme | None:
    """Return the scheme called `name` (None for "none"); raise ModelLoadError naming the fix."""
    if name in ("none", AUTO):  # auto is resolved against the file by the loader (gpu_worker.loading.loader)
        return None
    if name == "int8":
        return QuantScheme(8, None)
    if name == "int4":
        return QuantScheme(4, DEFAULT_INT4_GROUP)
    if name.startswith("int4-g"):
        return QuantScheme(4, _int4_group(name))
    if name in BNB_SCHEMES:
        try:
            import bitsandbytes  # noqa: F401  (optional; imported here so a missing one fails before loading)
        except ImportError:
            raise ModelLoadError(
                f"quantization {name!r} needs bitsandbytes, which is not installed: {BNB_INSTALL}"
            ) from None
        return QuantScheme(8, None, "bnb") if name == "bnb-int8" else QuantScheme(4, BNB_NF4_BLOCK, "bnb")
    raise ModelLoadError(f"unknown quantization {name!r}; choose one of {', '.join(SCHEMES)}")


def _int4_group(name: str) -> int:
    text = name.removeprefix("int4-g")
    if not (text.isdigit() and int(text) in INT4_GROUPS):
        fits = ", ".join(f"int4-g{g}" for g in INT4_GROUPS)
        raise ModelLoadError(
            f"quantization {name!r}: the int4 group size must be a power of two from {INT4_GROUPS[0]} to "
            f"{INT4_GROUPS[-1]} (the kernels' groups, along K); use one of {fits}"
        )
    return int(text)
