"""Batch-row bookkeeping for vLLM's V1 persistent batch.

vLLM tells a V1 logits processor how its batch changed through `BatchUpdate`: rows removed,
requests added at a row (possibly replacing whatever was there), and rows moved one-way or
swapped. There is no request id, so per-request state lives at its row and travels with it.
This module only keeps those books; it never touches tensors, and it imports nothing from
vLLM (so it is unit-testable and import-light).

Invariant kept here: every entry that leaves the table (removed, replaced by an add, or
overwritten by a one-way move) is handed to `release` exactly once, so cache slots never leak.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")


class BatchUpdateLike(Protocol):
    removed: Sequence[int]
    added: Sequence[tuple[int, Any, list[int] | None, list[int]]]
    moved: Sequence[tuple[int, int, Any]]


def _is_swap(direction: Any) -> bool:
    # vLLM's MoveDirectionality enum, compared by name so this module need not import vLLM.
    return getattr(direction, "name", direction) == "SWAP"


class RowTable(Generic[T]):
    """Row index -> entry, for the rows whose requests this processor acts on."""

    def __init__(self, release: Callable[[T], None]) -> None:
        self._rows: dict[int, T] = {}
        self._release = release

    def apply(
        self, update: BatchUpdateLike | None,
        make: Callable[[Any, list[int] | None, list[int]], T | None],
    ) -> bool:
        """Apply one step's update (removed, then added, then moved). Returns whether it changed.

        `make(params, prompt_token_ids, output_token_ids)` builds the entry for an added request,
        or returns None when the processor does not act on it.
        """
        if update is None:
            return False
        changed = False
        for row in update.removed:
            changed |= self._drop(row)
        for row, params, prompt_ids, output_ids in update.added:
            changed |= self._drop(row)  # an add may reuse a removed row without reporting it
            entry = make(params, prompt_ids, output_ids)
            if entry is not None:
                self._rows[row] = entry
                changed = True
        for a, b, direction in update.moved:
            entry_a, entry_b = self._rows.pop(a, None), self._rows.pop(b, None)
            if entry_a is not None:
                self._rows[b] = entry_a
            if entry_b is not None:
                if _is_swap(direction):
                    self._rows[a] = entry_b
                else:  # a one-way move overwrote b's request
                    self._release(entry_b)
            changed |= entry_a is not None or entry_b is not None
        return changed

    def clear(self) -> None:
        for row in list(self._rows):
            self._drop(row)

    def _drop(self, row: int) -> bool:
        entry = self._rows.pop(row, None)
        if entry is None:
            return False
        self._release(entry)
        return True

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, row: int) -> bool:
        return row in self._rows

    def __getitem__(self, row: int) -> T:
        return self._rows[row]

    def items(self) -> Iterator[tuple[int, T]]:
        """(row, entry) in ascending row order."""
        return iter(sorted(self._rows.items()))
