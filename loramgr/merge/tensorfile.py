"""The safetensors I/O of merges on numpy arrays: reading sources, writing results, bfloat16 by hand.

A merge reads each source file once (:class:`TensorFile`, memory-mapped, its header checked by
:func:`loramgr.safetensors_io.read_header`) and writes its result module by module
(:class:`SpillWriter`), byte for byte what the safetensors library's ``save_file`` writes. numpy has
no bfloat16: a bfloat16 value is the top 16 bits of a float32, so reading widens the bits and writing
rounds to nearest even as torch does (:func:`float32_to_bfloat16`). No torch anywhere here.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from ..errors import InvalidAdapterError
from ..safetensors_io import DTYPE_SIZES, float_view, non_finite_bits, read_header

#: the dtypes a merge reads (as float32 arrays) and writes, by safetensors name
FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_ST_NAMES = {name: st for st, name in FLOAT_DTYPES.items()}
_NUMPY_VIEWS = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}
#: what torch's (vectorised CPU) conversion writes for a NaN in bfloat16, whatever the NaN's sign
BF16_NAN = 0xFFFF

#: safetensors' dtypes in the order of its ``Dtype`` enum: a file's tensor data is laid out from the last
#: dtype of this list to the first, then by key
_DTYPE_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
                "I64", "U64")

Array = NDArray[Any]
Entry = tuple[str, str, tuple[int, ...]]  # key, dtype ("float32", "bfloat16", ... or a safetensors name), shape


class StoredTensor(NamedTuple):
    """A tensor as a safetensors file stores it: its dtype (safetensors name), shape and raw bytes.
    Copying one from file to file keeps every bit, whatever its dtype."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def values(self) -> NDArray[np.float64]:
        """The values of a float tensor as float64, exactly."""
        return raw_values(self.raw())

    def raw(self) -> Array:
        """A float tensor as an array of its stored values: float16/32/64, bfloat16 as its uint16 bits."""
        view = _NUMPY_VIEWS.get(self.dtype)
        if view is None:
            raise InvalidAdapterError(f"a {self.dtype} tensor is not a float tensor")
        return np.frombuffer(self.data, dtype=view).reshape(self.shape)

    @classmethod
    def from_raw(cls, raw: Array) -> StoredTensor:
        """The tensor of a :meth:`raw` array (rows cut, joined or zero-filled keep their bits)."""
        dtype = _RAW_DTYPES[raw.dtype.str[1:]]
        data = np.ascontiguousarray(raw, dtype=_NUMPY_VIEWS[dtype]).tobytes()
        return cls(dtype, tuple(raw.shape), data)

    def non_finite(self) -> str | None:
        """"NaN" when the tensor holds a NaN, else "Inf" when it holds an infinity, else None (and None
        for a tensor that is not a float)."""
        view = float_view(self.dtype)
        return non_finite_bits(np.frombuffer(self.data, dtype=view), self.dtype) if view else None

    def any_nonzero(self) -> bool:
        """Whether some element is not zero (a NaN is not zero, -0.0 is)."""
        view = float_view(self.dtype)
        if view is None:
            return any(self.data)
        bits = np.frombuffer(self.data, dtype=view)
        magnitude = ~np.array(1 << (8 * bits.itemsize - 1), dtype=bits.dtype)  # every bit but the sign
        return bool((bits & magnitude).any())


#: the numpy dtype of a raw array (byte order left out) -> safetensors dtype: factors are floats, so uint16
#: can only be bfloat16's bits
_RAW_DTYPES = {"f4": "F32", "f2": "F16", "f8": "F64", "u2": "BF16"}


def raw_values(raw: Array) -> NDArray[np.float64]:
    """The values of a :meth:`StoredTensor.raw` array as float64, exactly."""
    values = bfloat16_to_float32(raw) if _RAW_DTYPES[raw.dtype.str[1:]] == "BF16" else raw
    return np.asarray(values, dtype=np.float64)


def raw_dtype(raw: Array) -> str:
    """The safetensors dtype of a :meth:`StoredTensor.raw` array."""
    return _RAW_DTYPES[raw.dtype.str[1:]]


def stored_tensor(values: Array, dtype: str) -> StoredTensor:
    """``values`` rounded to ``dtype`` (a safetensors float name) as torch's ``.to(dtype)`` rounds: float64
    goes through float32 first, as torch converts a double to float16 and bfloat16."""
    values = np.asarray(values)
    name = FLOAT_DTYPES[dtype]
    with np.errstate(over="ignore"):  # past the dtype's range is ±Inf, as in torch
        if dtype in ("F16", "BF16"):
            values = values.astype(np.float32)
        return StoredTensor(dtype, tuple(values.shape), bytes(stored_bytes(values, name)))


def bfloat16_to_float32(bits: NDArray[np.uint16]) -> NDArray[np.float32]:
    """bfloat16 values (their 16-bit patterns) as float32, exactly: they are a float32's top 16 bits."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def float32_to_bfloat16(values: NDArray[np.float32]) -> NDArray[np.uint16]:
    """float32 to bfloat16 bit patterns, rounded to nearest even as torch's ``.to(torch.bfloat16)``
    rounds (overflow to ±Inf, subnormals kept, NaN as :data:`BF16_NAN`)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    bits = values.view(np.uint32)
    # adding 0x7FFF plus the lowest kept bit rounds half to even; a carry into the exponent is the
    # right rounding up (to the next binade, or to Inf past the largest finite bfloat16)
    lowest_kept = (bits >> np.uint32(16)) & np.uint32(1)
    rounded = ((bits + lowest_kept + np.uint32(0x7FFF)) >> np.uint32(16)).astype(np.uint16)
    rounded[np.isnan(values)] = BF16_NAN
    return rounded


def round_to_dtype(values: Array, dtype: str) -> Array:
    """``values`` as an array holding exactly what a ``dtype`` file stores: a float16/32/64 array of that
    dtype; for bfloat16 (which numpy lacks) a float32 array of bfloat16-rounded values."""
    if dtype == "bfloat16":
        return bfloat16_to_float32(float32_to_bfloat16(values.astype(np.float32, copy=False)))
    return np.ascontiguousarray(values, dtype=np.dtype(dtype))


def stored_bytes(values: Array, dtype: str) -> memoryview:
    """The little-endian bytes of ``values`` stored as ``dtype``."""
    if dtype == "bfloat16":
        array: Array = float32_to_bfloat16(values.astype(np.float32, copy=False))
    else:
        array = np.ascontiguousarray(values, dtype=np.dtype(dtype).newbyteorder("<"))
    return memoryview(array.data).cast("B")


class TensorFile:
    """An open safetensors file whose tensors are read as float32 arrays, one at a time.

    The header is parsed and checked once and the file kept open; use it as a context manager. Each
    tensor is read straight into its own buffer, not through a memory map: the pages
    of a map stay in the process's resident set until it is unmapped, so mapping a large source for a
    whole merge would count all of it in the merge's peak memory.
    """

    def __init__(self, path: str | Path) -> None:
        self.header = read_header(path)
        self._handle = open(self.header.path, "rb", buffering=0)  # noqa: SIM115 (closed by close())

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._handle.close()

    def stored(self, key: str) -> StoredTensor:
        """Tensor ``key`` as its file stores it, any dtype."""
        entry = self.header.tensors[key]
        data = os.pread(self._handle.fileno(), entry.offsets[1] - entry.offsets[0],
                        self.header.data_offset + entry.offsets[0])
        if len(data) != entry.offsets[1] - entry.offsets[0]:
            raise InvalidAdapterError(f"{self.header.path}: tensor {key!r} is cut short",
                                      path=str(self.header.path), module=key)
        return StoredTensor(entry.dtype, entry.shape, data)

    def array(self, key: str) -> NDArray[np.float32]:
        """Tensor ``key`` as a float32 array of its shape (bfloat16 and float16 exactly, float64 rounded
        to nearest)."""
        entry = self.header.tensors[key]
        view = _NUMPY_VIEWS.get(entry.dtype)
        if view is None:
            raise InvalidAdapterError(f"{self.header.path}: tensor {key!r} is {entry.dtype}, not a float tensor",
                                      path=str(self.header.path), module=key)
        raw = np.empty(entry.numel, dtype=view)
        buffer = memoryview(raw.data).cast("B")
        self._handle.seek(self.header.data_offset + entry.offsets[0])
        done = 0
        while done < buffer.nbytes:  # a read may return less than asked for
            got = self._handle.readinto(buffer[done:])
            if not got:
                raise InvalidAdapterError(f"{self.header.path}: tensor {key!r} is cut short",
                                          path=str(self.header.path), module=key)
            done += got
        if entry.dtype == "BF16":
            values = bfloat16_to_float32(raw)
        else:
            values = raw if entry.dtype == "F32" else raw.astype(np.float32)
        return values.reshape(entry.shape)


def _st_name(dtype: str) -> str:
    return _ST_NAMES.get(dtype, dtype)


def ordered(entries: list[Entry]) -> list[Entry]:
    """The order of the tensors' data in a safetensors file: dtype (see :data:`_DTYPE_ORDER`), then key."""
    return sorted(entries, key=lambda e: (-_DTYPE_ORDER.index(_st_name(e[1])), e[0]))


def safetensors_header(entries: list[Entry], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and header of a file of ``entries``, byte for byte as the safetensors library
    writes them: compact JSON, ``__metadata__`` first, tensors in :func:`ordered` order, spaces up to a
    multiple of 8 bytes."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, dtype, shape in ordered(entries):
        size = DTYPE_SIZES[_st_name(dtype)] * math.prod(shape)
        header[key] = {"dtype": _st_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path: str | Path, arrays: dict[str, Array], dtype: str, metadata: dict[str, str]) -> None:
    """Write ``arrays`` (held as :func:`round_to_dtype` holds them) as a ``dtype`` safetensors file,
    one tensor at a time. Not atomic by itself: callers write to a temporary file (loramgr.fileio)."""
    entries = [(key, dtype, tuple(array.shape)) for key, array in arrays.items()]
    with open(path, "wb") as handle:
        handle.write(safetensors_header(entries, metadata))
        for key, _, _ in ordered(entries):
            handle.write(stored_bytes(arrays[key], dtype))


def safetensors_bytes(tensors: Mapping[str, StoredTensor], metadata: dict[str, str]) -> bytes:
    """A whole safetensors file of ``tensors``, each in its own dtype, byte for byte as the safetensors
    library's ``save`` writes it."""
    entries = [(key, tensor.dtype, tensor.shape) for key, tensor in tensors.items()]
    parts = [safetensors_header(entries, metadata)]
    parts += [tensors[key].data for key, _, _ in ordered(entries)]
    return b"".join(parts)


class SpillWriter:
    """A safetensors file written module by module, whatever order its tensors come in.

    A merge learns a module's rank only when it has merged it (an energy threshold, null directions
    dropped), so the header, which comes first and holds every shape and offset, can only be written
    at the end. Each tensor goes to a spill file as it is produced; :meth:`finish` writes the header
    and copies the tensors into their places (in the kernel, ``os.copy_file_range``), giving the bytes
    of :func:`write_safetensors`. No tensor stays in memory once written.
    """

    def __init__(self, spill: Path, dtype: str) -> None:
        self.dtype = dtype
        self.spill = spill
        self._handle = open(spill, "wb")  # noqa: SIM115 (closed by finish() or discard())
        self._where: dict[str, tuple[int, int, tuple[int, ...]]] = {}
        self._size = 0

    def add(self, key: str, values: Array) -> None:
        data = stored_bytes(values, self.dtype)
        self._handle.write(data)
        self._where[key] = (self._size, data.nbytes, tuple(values.shape))
        self._size += data.nbytes

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: shape for key, (_, _, shape) in self._where.items()}

    def finish(self, path: Path, metadata: dict[str, str]) -> None:
        """Write the whole file at ``path`` (the caller makes that atomic); the spill file goes."""
        self._handle.close()
        entries = [(key, self.dtype, shape) for key, (_, _, shape) in self._where.items()]
        with open(self.spill, "rb") as source, open(path, "wb") as target:
            target.write(safetensors_header(entries, metadata))
            target.flush()
            for key, _, _ in ordered(entries):
                start, size, _ = self._where[key]
                _copy_range(source.fileno(), target.fileno(), start, size)
        self.discard()

    def discard(self) -> None:
        self._handle.close()
        self.spill.unlink(missing_ok=True)


def _copy_range(source: int, target: int, start: int, size: int) -> None:
    """Append ``size`` bytes of ``source`` from offset ``start`` to ``target``."""
    copied = 0
    while copied < size:
        try:
            step = os.copy_file_range(source, target, size - copied, start + copied)
        except (AttributeError, OSError):  # no copy_file_range on this system or file system
            step = _copy_through_memory(source, target, start + copied, min(size - copied, 1 << 24))
        if step <= 0:
            raise OSError(f"short copy: {copied} of {size} bytes")
        copied += step


def _copy_through_memory(source: int, target: int, offset: int, size: int) -> int:
    data = os.pread(source, size, offset)
    return os.write(target, data)
