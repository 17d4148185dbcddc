"""The safetensors file format, read and written by this package without the `safetensors` library,
so that a merge reads each tensor's bytes straight into its own reused buffers (`os.preadv`) and
writes the output tensor by tensor, never holding a whole file.

A file is: 8 bytes (little-endian u64) N, N bytes of JSON (name -> {"dtype", "shape",
"data_offsets": [begin, end]} relative to the data, and an optional "__metadata__" of strings), then
the data. https://github.com/huggingface/safetensors documents the format."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # as the safetensors library: a larger header is a damaged file


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: where its bytes are (absolute file offsets)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: str | os.PathLike) -> tuple[dict[str, Entry], dict[str, str]]:
    """The tensors of the file at `path` (in the order of their data) and its metadata, checked:
    every entry's dtype known, its bytes the size its shape says, inside the file."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(
                f"{os.fspath(path)!r} is not a safetensors file (shorter than its 8-byte header size)"
            )
        (length,) = struct.unpack("<Q", prefix)
        if length > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{os.fspath(path)!r} is damaged: its header size {length} exceeds the file")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{os.fspath(path)!r} is damaged: its header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{os.fspath(path)!r} is damaged: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + length
    entries = {name: _entry(path, name, info, start, size) for name, info in header.items()}
    return dict(sorted(entries.items(), key=lambda item: item[1].begin)), metadata


def _entry(path, name: str, info, start: int, size: int) -> Entry:
    try:
        dtype = DTYPES[info["dtype"]]
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{os.fspath(path)!r} is damaged: the entry of {name!r} is {info!r}") from None
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * dtype.itemsize
    if begin < 0 or end - begin != nbytes or start + end > size:
        raise ValueError(
            f"{os.fspath(path)!r} is damaged or truncated: {name!r} ({info['dtype']} {list(shape)}, "
            f"{nbytes} bytes) has data offsets [{begin}, {end}] in a data section of {size - start} bytes"
        )
    return Entry(dtype, shape, start + begin, start + end)


def header_bytes(entries: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """The 8-byte size and JSON header of a file holding `entries` (name -> (dtype, shape)) in order,
    padded with spaces so that the data starts 8-byte aligned (as the safetensors library writes)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (dtype, shape) in entries.items():
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        header[name] = {
            "dtype": NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text
