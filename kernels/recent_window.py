"""The exact recent window that ``decode_attention`` reads instead of the fp8 bytes, and its ring buffers.

A ring buffer ``[B, H, R, D]`` holds position p at slot ``p % R``, so it keeps the last R positions written.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["RecentWindow", "ring_read", "ring_write"]


class RecentWindow(NamedTuple):
    """The exact K/V of the most recent cached positions ``[start, kv_length)`` for ``decode_attention``.

    ``keys`` / ``values``: ring buffers ``[B, H, R, D]`` in the query's dtype; position p sits at slot ``p % R``, so
    at most R positions (``kv_length - start <= R``).
    """

    keys: torch.Tensor
    values: torch.Tensor
    start: int


def _ring_spans(first: int, end: int, R: int):
    """Positions ``[first, end)`` (at most R of them) as contiguous ring slices: ``(slot, offset from first, n)``.
    The span wraps the ring at most once, so there are at most two."""
    position = first
    while position < end:
        slot = position % R
        n = min(end - position, R - slot)
        yield slot, position - first, n
        position += n


def ring_read(ring: torch.Tensor, start: int, end: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Positions ``[start, end)`` of a ring buffer ``[B, H, R, D]`` (position p at slot ``p % R``), in order,
    copied into ``out`` ``[B, H, end - start, D]`` (any dtype; a new tensor when not given)."""
    if out is None:
        out = ring.new_empty(ring.shape[0], ring.shape[1], end - start, ring.shape[3])
    for slot, offset, n in _ring_spans(start, end, ring.shape[2]):
        out[:, :, offset : offset + n] = ring[:, :, slot : slot + n]
    return out


def ring_write(ring: torch.Tensor, states: torch.Tensor, start: int) -> None:
    """Store ``states`` ``[B, H, S, D]`` (positions ``start ..``) in the ring; only the last R positions stay."""
    R, S = ring.shape[2], states.shape[2]
    first = max(start, start + S - R)
    skipped = first - start
    for slot, offset, n in _ring_spans(first, start + S, R):
        ring[:, :, slot : slot + n] = states[:, :, skipped + offset : skipped + offset + n]
