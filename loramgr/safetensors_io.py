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
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    header = _parse_json(raw, path, hint)
    data_size = size - 8 - length
    metadata = _metadata(header.pop("__metadata__", None), path, hint)
    tensors: dict[str, TensorEntry] = {}
    for name, entry in header.items():
        tensors[name] = _entry(name, entry, data_size, path, hint)
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
    return SafetensorsHeader(path, tensors, metadata, 8 + length, size)


#: the safetensors library parses the header with serde_json, which stops at 128 levels of nesting
MAX_NESTING = 128
_UINT_MAX = 2**64 - 1


def _parse_json(raw: bytes, path: Path, hint: str) -> dict[str, Any]:
    """The header as the safetensors library reads it: strict UTF-8 JSON, no NaN / Infinity, no lone
    surrogates, at most MAX_NESTING levels deep, an object at the top."""

    def refuse(why: str) -> InvalidAdapterError:
        return InvalidAdapterError(f"{path}: safetensors header {why}", path=str(path), hint=hint)

    def constant(name: str) -> None:
        raise refuse(f"holds {name}, which is not JSON")

    try:
        text = raw.decode("utf-8")
        if _depth(text) > MAX_NESTING:
            raise refuse(f"nests deeper than {MAX_NESTING} levels")
        header = json.loads(text, parse_constant=constant)
    except UnicodeDecodeError as exc:
        raise refuse("is not valid JSON (not UTF-8 text)") from exc
    except json.JSONDecodeError as exc:
        raise refuse(f"is not valid JSON ({exc.msg} at byte {exc.pos})") from exc
    except RecursionError as exc:
        raise refuse(f"nests deeper than {MAX_NESTING} levels") from exc
    if not isinstance(header, dict):
        raise refuse("is not a JSON object")
    for key in header:
        if has_surrogate(key):
            raise refuse(f"has a tensor name with a lone surrogate ({key!r})")
    return header


def _depth(text: str) -> int:
    """How deeply the JSON text nests arrays and objects (brackets inside strings do not count)."""
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_STRINGS.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")


def has_surrogate(text: str) -> bool:
    """True if ``text`` holds a lone UTF-16 surrogate (JSON's "\\ud800"), which is not Unicode text."""
    return any("\ud800" <= char <= "\udfff" for char in text)


def _metadata(value: object, path: Path, hint: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidAdapterError(f"{path}: safetensors __metadata__ is a {type(value).__name__}, not an object "
                                  "of strings", path=str(path), hint=hint)
    for key, item in value.items():
        if not isinstance(item, str):
            raise InvalidAdapterError(f"{path}: safetensors __metadata__[{key!r}] is a {type(item).__name__}, "
                                      "not a string", path=str(path), hint=hint)
        if has_surrogate(key) or has_surrogate(item):
            raise InvalidAdapterError(f"{path}: safetensors __metadata__[{key!r}] holds a lone surrogate",
                                      path=str(path), hint=hint)
    return dict(value)


def _uints(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= _UINT_MAX for x in value)


def _entry(name: str, entry: object, data_size: int, path: Path, hint: str) -> TensorEntry:
    """One tensor's header entry, checked field by field as the safetensors library checks it."""

    def refuse(why: str) -> InvalidAdapterError:
        return InvalidAdapterError(f"{path}: header entry of tensor {name!r}: {why}", path=str(path),
                                   module=name, hint=hint)

    if not isinstance(entry, dict):
        raise refuse(f"is a {type(entry).__name__}, not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise refuse(f"no {key}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise refuse(f"dtype {dtype!r} is not one of {', '.join(DTYPE_SIZES)}")
    if not _uints(shape):
        raise refuse(f"shape {shape!r} is not a list of non-negative integers")
    if not _uints(offsets) or len(offsets) != 2:
        raise refuse(f"data_offsets {offsets!r} is not a pair of non-negative integers")
    start, end = offsets
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end < start or end - start != expected or end > data_size:
        raise refuse(f"{dtype} {list(shape)} needs {expected} bytes, data_offsets [{start}, {end}] "
                     f"{'lie outside the file' if end > data_size else 'disagree'}")
    return TensorEntry(dtype, tuple(shape), (start, end))


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
    values = np.frombuffer(data, dtype=bits[0], count=entry.numel, offset=data_offset + entry.offsets[0])  # type: ignore[call-overload]
    for start in range(0, entry.numel, _SCAN_ELEMENTS):
        verdict = non_finite_bits(values[start : start + _SCAN_ELEMENTS], entry.dtype)
        if verdict is not None:
            return verdict
    return None


def float_view(dtype: str) -> str | None:
    """The numpy unsigned-integer dtype whose values are the bit patterns of safetensors float ``dtype``
    (None for a dtype that is not a float)."""
    bits = _FLOAT_BITS.get(dtype)
    return bits[0] if bits else None


def non_finite_bits(bits: Any, dtype: str) -> str | None:
    """"NaN" when the ``dtype`` values whose bit patterns are ``bits`` (an array of :func:`float_view`)
    hold a NaN, else "Inf" when they hold an infinity, else None."""
    _, exponent, mantissa = _FLOAT_BITS[dtype]
    bad = bits[(bits & exponent) == exponent]
    if not bad.size:
        return None
    return "NaN" if bool((bad & mantissa).any()) else "Inf"
