"""Reads a GGUF file's header, metadata and tensor table in one pass over a memory map, with plain `struct` reads.

gguf-py's GGUFReader makes a numpy view for every string of the metadata: SmolLM2's 49k tokens and 48k merges
cost it 6 s per open on a 2-core box, and a worker and its web tier open the file three times between them.
Here the same file opens in about a tenth of a second; tensors stay views of the map until they are read.
Little-endian GGUF v2 and v3 only (what llama.cpp writes on every common machine).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_ARRAY_DEPTH = 8  # llama.cpp writes arrays of scalars or strings; deeper nesting would only recurse

# GGUF metadata value types (gguf.GGUFValueType): the fixed-size ones as struct formats.
_STRING, _ARRAY = 8, 9
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}  # fmt: skip
# Tensor types whose data is an array of numbers; every other type is blocks of bytes.
_PLAIN_TENSORS = {
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file: `shape` in GGUF's order (innermost first) and `data` shaped as gguf-py shapes
    it (numbers for float and integer types, [..., bytes per row] uint8 for block types), so
    gguf.quants.dequantize takes it as it is."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    n_bytes: int
    data: np.ndarray


class GGUFFile:
    """`fields`: metadata key -> value (str, int, float, bool or a list of them); `tensors`: in file order.
    A file that is not GGUF, or is cut short, raises ValueError (OSError if it cannot be read at all)."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # ValueError if empty
        self._offset = 0
        self.fields: dict[str, Any] = {}
        self.tensors: list[GGUFTensor] = []
        try:
            self._read()
        except (struct.error, KeyError, IndexError) as exc:  # cut short, or a type this reader does not know
            raise ValueError(f"malformed GGUF at byte {self._offset}: {exc!r}") from exc

    def _read(self) -> None:
        if bytes(self._map[:4]) != MAGIC:
            raise ValueError("GGUF magic invalid")
        self._offset = 4
        version = self._scalar(4)
        if version not in VERSIONS:
            raise ValueError(f"GGUF version {version} (big-endian, or not {' / '.join(map(str, VERSIONS))})")
        tensor_count, field_count = self._scalar(10), self._scalar(10)
        for _ in range(field_count):
            key = self._string()
            self.fields[key] = self._value(self._scalar(4))
        infos = [self._tensor_info() for _ in range(tensor_count)]
        alignment = self.fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1:
            raise ValueError(f"general.alignment must be a positive integer, not {alignment!r}")
        data_start = -(-self._offset // alignment) * alignment
        data = np.frombuffer(self._map, dtype=np.uint8)
        self.tensors = [self._tensor(data, data_start, *info) for info in infos]

    def _scalar(self, kind: int) -> Any:
        fmt = "<" + _SCALARS[kind]
        (value,) = struct.unpack_from(fmt, self._map, self._offset)
        self._offset += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        size = self._scalar(10)
        start, self._offset = self._offset, self._offset + size
        return self._map[start : self._offset].decode("utf-8")

    def _value(self, kind: int, depth: int = 0) -> Any:
        if kind == _STRING:
            return self._string()
        if kind in _SCALARS:
            return self._scalar(kind)
        if kind != _ARRAY:
            raise ValueError(f"unknown GGUF value type {kind}")
        if depth == MAX_ARRAY_DEPTH:
            raise ValueError(f"GGUF arrays nested more than {MAX_ARRAY_DEPTH} deep")
        item, count = self._scalar(4), self._scalar(10)
        if item in _NUMPY:  # one read for the whole array (token types, scores)
            values: np.ndarray = np.frombuffer(self._map, _NUMPY[item], count, self._offset)
            self._offset += values.nbytes
            return values.tolist()
        return [self._value(item, depth + 1) for _ in range(count)]

    def _tensor_info(self) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
        name = self._string()
        shape = tuple(self._scalar(10) for _ in range(self._scalar(4)))
        return name, shape, GGMLQuantizationType(self._scalar(4)), self._scalar(10)

    @staticmethod
    def _tensor(
        data: np.ndarray, start: int, name: str, shape: tuple[int, ...], kind: GGMLQuantizationType, at: int
    ) -> GGUFTensor:
        block, type_size = GGML_QUANT_SIZES[kind]
        n_bytes = int(np.prod(shape)) * type_size // block
        raw = data[start + at : start + at + n_bytes]
        numpy_shape = tuple(reversed(shape))
        if kind in _PLAIN_TENSORS:
            array = raw.view(_PLAIN_TENSORS[kind]).reshape(numpy_shape)
        else:
            array = raw.reshape(quant_shape_to_byte_shape(numpy_shape, kind))
        return GGUFTensor(name, kind, shape, n_bytes, array)
