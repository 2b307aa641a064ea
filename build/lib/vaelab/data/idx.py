"""Reader for the idx format of the MNIST files, strict about size and magic number."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import torch

UINT8 = 0x08


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """Read an uncompressed idx file of unsigned bytes with ``ndim`` dimensions.

    Raises ``ValueError`` naming the file when the magic number, the dimension count or
    the file size disagrees with the header, so a truncated download never becomes a
    silently smaller dataset.
    """
    data = Path(path).read_bytes()
    header = 4 + 4 * ndim
    fix = "Delete it and download it again (or copy an intact copy there)."
    if len(data) < header:
        raise ValueError(
            f"{path} is {len(data)} bytes, too short for an idx header: truncated or not an "
            f"idx file. {fix}"
        )
    if data[:2] != b"\x00\x00" or data[2] != UINT8 or data[3] != ndim:
        raise ValueError(
            f"{path} has magic number 0x{data[:4].hex()}, expected 0x000008{ndim:02x} "
            f"(unsigned bytes, {ndim} dimensions): not the expected idx file, or compressed. {fix}"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + math.prod(dims)
    if len(data) != expected:
        raise ValueError(
            f"{path} is {len(data)} bytes but its header declares shape {dims} "
            f"({expected} bytes): the file is truncated or corrupt. {fix}"
        )
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
    return torch.from_numpy(array.copy())
