"""Fixed-width bit packing of non-negative integers (token ids, draw counts) into a uint8 stream.

Entry e occupies bits [e*b, (e+1)*b) of the stream, least significant bit first (little-endian within
and across bytes), so entries a..b of a stream are read from bytes floor(a*b/8) .. ceil(b*b/8) alone:
a reader decodes a row range without touching the rest of the shard. At V = 262,144 an id takes
ceil(log2 V) = 18 bits instead of the 32 of an int32; at V = 49,152, 16 bits, as a uint16.
Widths up to 25 bits are supported (an entry then spans at most 4 bytes).
"""

from __future__ import annotations

import math

import numpy as np

MAX_BITS = 25


def bits_for(max_value: int) -> int:
    """Bits needed for every integer in 0..max_value (at least 1)."""
    return max(1, int(math.ceil(math.log2(int(max_value) + 1))))


def packed_nbytes(count: int, bits: int) -> int:
    return (int(count) * int(bits) + 7) // 8


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """values (integers in 0..2^bits-1) -> uint8 stream of packed_nbytes(len(values), bits) bytes."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bit width {bits} outside 1..{MAX_BITS}")
    v = np.asarray(values).reshape(-1).astype(np.uint64)
    n = v.shape[0]
    size = packed_nbytes(n, bits)
    if n == 0:
        return np.zeros(size, np.uint8)
    if int(v.max()) >> bits:
        raise ValueError(f"value {int(v.max())} does not fit in {bits} bits")
    offset = np.arange(n, dtype=np.uint64) * np.uint64(bits)
    byte = (offset >> np.uint64(3)).astype(np.int64)
    word = v << (offset & np.uint64(7))
    out = np.zeros(size + 4, np.float64)
    # The entries' bit ranges are disjoint, so adding their bytes is OR-ing them (exact in float64).
    for j in range((bits + 7 + 7) // 8):
        part = ((word >> np.uint64(8 * j)) & np.uint64(0xFF)).astype(np.float64)
        out += np.bincount(byte + j, weights=part, minlength=size + 4)[: size + 4]
    return out[:size].astype(np.uint8)


def unpack(stream: np.ndarray, bits: int, start: int, count: int) -> np.ndarray:
    """Entries start..start+count of a packed stream, as int64."""
    if count <= 0:
        return np.zeros(0, np.int64)
    first_bit = int(start) * bits
    b0 = first_bit // 8
    b1 = packed_nbytes(int(start) + int(count), bits)
    span = (bits + 7 + 7) // 8
    raw = np.zeros(b1 - b0 + span, np.uint64)
    raw[: b1 - b0] = np.asarray(stream[b0:b1], dtype=np.uint8)
    offset = np.arange(count, dtype=np.int64) * bits + (first_bit - 8 * b0)
    byte = offset >> 3
    word = np.zeros(count, np.uint64)
    for j in range(span):
        word |= raw[byte + j] << np.uint64(8 * j)
    return ((word >> (offset & 7).astype(np.uint64)) & np.uint64((1 << bits) - 1)).astype(np.int64)
