"""The quantisation schemes by name (`--quantization`), parsed once before anything is loaded."""

from __future__ import annotations

from dataclasses import dataclass

from gpu_worker.errors import ModelLoadError

INT4_GROUPS = (32, 64, 128)
DEFAULT_INT4_GROUP = 128
SCHEMES = ("none", "int8", "int4", *(f"int4-g{g}" for g in INT4_GROUPS))
BNB_SCHEMES = ("bnb-int8", "bnb-nf4")


@dataclass(frozen=True)
class QuantScheme:
    """A weight-only scheme: 8-bit symmetric or 4-bit asymmetric, in groups of group_size along K.

    group_size None means one scale per output channel (int8 from full precision); GGUF Q8_0 weights load
    as int8 with group_size 32, their own block.
    """

    bits: int
    group_size: int | None

    def describe(self) -> str:
        """Return e.g. "int8 per-channel", "int4 g128"."""
        return f"int{self.bits} " + ("per-channel" if self.group_size is None else f"g{self.group_size}")


def parse_scheme(name: str) -> QuantScheme | None:
    """Return the scheme called `name` (None for "none"); raise ModelLoadError naming the choices."""
    if name == "none":
        return None
    if name == "int8":
        return QuantScheme(8, None)
    if name == "int4":
        return QuantScheme(4, DEFAULT_INT4_GROUP)
    if name.startswith("int4-g") and name in SCHEMES:
        return QuantScheme(4, int(name.removeprefix("int4-g")))
    if name in BNB_SCHEMES:
        raise ModelLoadError(
            f"quantization {name!r} (bitsandbytes) is not built yet; use int8 or int4 (faster at decode anyway)"
        )
    raise ModelLoadError(f"unknown quantization {name!r}; choose one of {', '.join(SCHEMES)}")
