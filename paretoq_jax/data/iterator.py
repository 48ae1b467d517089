"""A deterministic, resumable, multi-host batch iterator over token blocks.

The training data is an endless stream of block indices: epoch ``e`` visits all ``n`` blocks in
the order ``permutation(n, seed, e)`` (the identity when ``shuffle=False``), epochs follow each
other without a gap, and global batch ``k`` is stream positions ``[k*B, (k+1)*B)`` (a batch can
straddle two epochs; nothing is dropped). The state after a batch is the stream position as
``(epoch, position)``; restoring it yields exactly the batch that would have come next.

Process ``p`` of ``P`` returns rows ``[p*B/P, (p+1)*B/P)`` of each global batch and reads only those
blocks, so the global batches do not depend on ``P``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .config import DataError

__all__ = ["IteratorState", "BatchIterator", "permutation"]


def permutation(n: int, seed: int, *stream: int) -> np.ndarray:
    """A permutation of ``range(n)`` determined by ``(seed, *stream)``, stable across numpy
    versions: it argsorts raw 64-bit PCG64 outputs, whose sequence numpy guarantees (unlike
    `Generator.permutation`)."""
    bits = np.random.PCG64(np.random.SeedSequence([int(seed), *map(int, stream)]))
    keys = bits.random_raw(n)
    return np.argsort(keys, kind="stable").astype(np.int64)


@dataclasses.dataclass(frozen=True)
class IteratorState:
    """Where the stream stands: the next batch starts at ``position`` of epoch ``epoch``."""

    epoch: int = 0
    position: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "position": int(self.position)}

    @classmethod
    def from_dict(cls, d: Any) -> IteratorState:
        """From a dict (e.g. restored by Orbax, values may be 0-d arrays) or an IteratorState."""
        if isinstance(d, IteratorState):
            return d
        try:
            return cls(epoch=int(d["epoch"]), position=int(d["position"]))
        except (KeyError, TypeError) as e:
            raise DataError(f"not an iterator state (need epoch and position): {d!r}") from e


class BatchIterator:
    """Endless batches of token blocks; see the module docstring for the order.

    ``next()`` returns an int32 array ``(global_batch_size // process_count, seq_len)``: this
    process's rows of the next global batch. ``state`` is the position after the last batch.
    """

    def __init__(
        self,
        blocks: Any,
        global_batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        state: IteratorState | dict | None = None,
    ) -> None:
        self._blocks = blocks
        self.num_blocks = len(blocks)
        if self.num_blocks == 0:
            raise DataError("no training blocks to iterate over")
        if global_batch_size < 1:
            raise DataError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise DataError(f"bad process_index={process_index} of process_count={process_count}")
        if global_batch_size % process_count:
            raise DataError(
                f"global_batch_size={global_batch_size} is not divisible by the number of "
                f"processes ({process_count})"
            )
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = self.global_batch_size // process_count
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        st = IteratorState() if state is None else IteratorState.from_dict(state)
        if st.epoch < 0 or not 0 <= st.position < self.num_blocks:
            raise DataError(
                f"iterator state {st} does not fit {self.num_blocks} blocks (position must be in "
                f"[0, {self.num_blocks})); was it saved for another dataset or seq_len?"
            )
        self._epoch, self._position = st.epoch, st.position
        self._order_epoch = -1
        self._order = np.empty(0, np.int64)

    @property
    def state(self) -> IteratorState:
        return IteratorState(self._epoch, self._position)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            n = self.num_blocks
            self._order = permutation(n, self.seed, epoch) if self.shuffle else np.arange(n)
            self._order_epoch = epoch
        return self._order

    def _take(self, count: int) -> np.ndarray:
        """The next ``count`` stream indices; advances the state."""
        out = np.empty(count, np.int64)
        filled = 0
        while filled < count:
            order = self._epoch_order(self._epoch)
            k = min(count - filled, self.num_blocks - self._position)
            out[filled : filled + k] = order[self._position : self._position + k]
            filled += k
            self._position += k
            if self._position == self.num_blocks:
                self._epoch, self._position = self._epoch + 1, 0
        return out

    def next_indices(self) -> np.ndarray:
        """Block indices of this process's rows of the next global batch (advances the state)."""
        idx = self._take(self.global_batch_size)
        lo = self.process_index * self.local_batch_size
        return idx[lo : lo + self.local_batch_size]

    def next(self) -> np.ndarray:
        """This process's rows of the next global batch, int32 ``(local_batch, seq_len)``."""
        idx = self.next_indices()
        return np.asarray(self._blocks[idx], dtype=np.int32)

    def __next__(self) -> np.ndarray:
        return self.next()

    def __iter__(self) -> BatchIterator:
        return self
