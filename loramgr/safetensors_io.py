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
from collections.abc import Callable
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

#: float dtype -> (unsigned view, exponent mask, mantissa mask): a value is Inf or NaN when every
#: exponent bit is set, NaN when its mantissa is also non-zero (float8 e4m3fn: all bits but the sign set)
_FLOAT_BITS = {
    "F16": ("<u2", 0x7C00, 0x03FF),
    "BF16": ("<u2", 0x7F80, 0x007F),
    "F32": ("<u4", 0x7F800000, 0x007FFFFF),
    "F64": ("<u8", 0x7FF0000000000000, 0x000FFFFFFFFFFFFF),
    "F8_E5M2": ("u1", 0x7C, 0x03),
    "F8_E4M3": ("u1", 0x7F, 0x7F),
}
_SCAN_ELEMENTS = 1 << 22


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
    # the format requires the tensors to tile the data section exactly (safetensors refuses holes/overlaps)
    position = 0
    for name, entry in sorted(tensors.items(), key=lambda item: item[1].offsets):
        if entry.offsets[0] != position:
            raise InvalidAdapterError(
                f"{path}: tensor {name!r} starts at byte {entry.offsets[0]} of the data, expected {position}",
                path=str(path),
                hint=hint,
            )
        position = entry.offsets[1]
    if position != data_size:
        raise InvalidAdapterError(
            f"{path}: {data_size - position} bytes after the last tensor", path=str(path), hint=hint
        )
    return SafetensorsHeader(path, tensors, dict(metadata), 8 + length, size)


def find_non_finite(header: SafetensorsHeader, progress: Callable[[str, int, int], None] | None = None
                    ) -> tuple[str, str] | None:
    """The first floating-point tensor holding NaN or Inf, as (name, "NaN" | "Inf"), or None.

    Reads every byte of the data section once through mmap and tests the exponent bits with numpy, in
    chunks: no torch import, no copy of the tensors, one thread (torch's isfinite on mmapped tensors
    was ten times slower on a busy 2-core machine).
    """
    import mmap

    if header.file_size <= header.data_offset:
        return None
    names = sorted(header.tensors, key=lambda n: header.tensors[n].offsets)
    with open(header.path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for i, name in enumerate(names):
            verdict = _scan(data, header.data_offset, header.tensors[name])
            if verdict is not None:
                return name, verdict
            if progress:
                progress("checking", i + 1, len(names))
    return None


def _scan(data: object, data_offset: int, entry: TensorEntry) -> str | None:
    # the numpy views live only in this frame, so the caller's mmap can close when it is done
    import numpy as np

    bits = _FLOAT_BITS.get(entry.dtype)
    if bits is None or not entry.numel:
        return None
    view, exponent, mantissa = bits
    values = np.frombuffer(data, dtype=view, count=entry.numel, offset=data_offset + entry.offsets[0])  # type: ignore[call-overload]
    for start in range(0, entry.numel, _SCAN_ELEMENTS):
        chunk = values[start : start + _SCAN_ELEMENTS]
        bad = chunk[(chunk & exponent) == exponent]
        if bad.size:
            return "NaN" if bool((bad & mantissa).any()) else "Inf"
    return None
