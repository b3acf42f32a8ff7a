"""Small helpers for runs on several processes (Lightning's DDP): what every rank needs to agree on."""

from __future__ import annotations

import torch


def world_size() -> int:
    """Processes in the default process group (1 when not distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def gather_union(rows: dict) -> dict:
    """The union of every rank's ``rows``, the same on every rank (one process: ``rows`` itself).

    A key held by several ranks (a row repeated to give ranks equal shares) appears once. Every rank must call
    this, as with any collective.

    Args:
        rows: picklable key -> value pairs of this rank, e.g. validation row index -> (reference, hypothesis).
    """
    n = world_size()
    if n == 1:
        return dict(rows)
    shards: list = [None] * n
    torch.distributed.all_gather_object(shards, rows)
    return {key: value for shard in shards for key, value in sorted(shard.items())}
