"""Reading safetensors headers without torch and without reading tensor data.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [start, end]}, "__metadata__": {str: str}}``), then the
tensor data. Everything loramgr needs for metadata, fingerprints and checks is in that header, so this
module validates it strictly (a truncated or corrupt file is caught here, before any tensor is read).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidAdapterError

#: bytes per element of each safetensors dtype
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

#: safetensors dtype name -> torch dtype name
TORCH_DTYPE_NAMES = {
    "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
    "I8": "int8", "U8": "uint8", "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32", "U64": "uint64",
}  # fmt: skip

MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    dtype: str  # safetensors name, e.g. "F32"
    shape: tuple[int, ...]
    offsets: tuple[int, int]  # [start, end) relative to the data section

    @property
    def torch_dtype(self) -> str:
        return TORCH_DTYPE_NAMES.get(self.dtype, self.dtype.lower())

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)
    data_offset: int = 0  # file offset where tensor data starts (8 + N)
    file_size: int = 0


def read_header(path: str | Path) -> SafetensorsHeader:
    """Parse and validate the header of a safetensors file; raises InvalidAdapterError naming the file."""
    path = Path(path)
    hint = "the file is truncated or not a safetensors file; re-download or re-save it"
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise InvalidAdapterError(f"{path}: file too short for a safetensors header", path=str(path), hint=hint)
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or length + 8 > size:
                raise InvalidAdapterError(
                    f"{path}: safetensors header length {length} does not fit a {size}-byte file",
                    path=str(path),
                    hint=hint,
                )
            raw = handle.read(length)
    except OSError as exc:
        raise InvalidAdapterError(f"{path}: cannot read ({exc.strerror})", path=str(path)) from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAdapterError(f"{path}: safetensors header is not valid JSON", path=str(path), hint=hint) from exc
    if not isinstance(header, dict):
        raise InvalidAdapterError(f"{path}: safetensors header is not a JSON object", path=str(path), hint=hint)
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - length
    tensors: dict[str, TensorEntry] = {}
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidAdapterError(
                f"{path}: malformed header entry for tensor {name!r}", path=str(path), hint=hint
            ) from exc
        expected = math.prod(shape) * DTYPE_SIZES.get(dtype, 0)
        if dtype not in DTYPE_SIZES or end - start != expected or start < 0 or end > data_size:
            raise InvalidAdapterError(
                f"{path}: tensor {name!r} ({dtype}, shape {list(shape)}) lies outside the file's data",
                path=str(path),
                hint=hint,
            )
        tensors[name] = TensorEntry(dtype, shape, (start, end))
    return SafetensorsHeader(path, tensors, dict(metadata), 8 + length, size)
