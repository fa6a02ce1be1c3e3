"""Training order: reshuffled passes over a dataset, one batch of indices at a time."""

from __future__ import annotations

import random


def next_indices(order: list[int], size: int, batch_size: int, rng: random.Random) -> list[int]:
    """The next `batch_size` indices of reshuffled passes over `size` items.

    `order` holds what is left of the current pass and is consumed in place (a new shuffled
    pass is appended when fewer than `batch_size` remain), so a caller that must resume can
    save and restore it with `rng`'s state.
    """
    if len(order) < batch_size:
        fresh = list(range(size))
        rng.shuffle(fresh)
        order.extend(fresh)
    batch = order[:batch_size]
    del order[:batch_size]
    return batch
