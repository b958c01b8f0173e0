"""A bounded map that drops its least recently used entry first: the runtime's caches of
prepared ops (attention(), paged_attention()) and of what one call checked and bound.

It keeps its entries in a plain dict in use order (an entry used is moved to the end): dict
operations stay safe when a weakref callback removes an entry in the middle of another
(runtime/prepared.py keys entries by tensors it holds weakly)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    """At most `size` entries; `get` marks an entry used, `put` drops the least recently used
    one past the size."""

    __slots__ = ("size", "_entries")

    def __init__(self, size: int):
        self.size = size
        self._entries: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        """The entry of `key` (now the most recently used), or None."""
        found = self._entries.pop(key, None)
        if found is not None:
            self._entries[key] = found
        return found

    def get_or_make(self, key: K | None, make: Callable[[], V]) -> V:
        """The entry of `key`, else a new one made by `make()` and kept, except under the key
        None (what cannot be keyed is made again at every call and kept nowhere)."""
        found = None if key is None else self.get(key)
        if found is None:
            found = make()
            if key is not None:
                self.put(key, found)
        return found

    def put(self, key: K, value: V) -> None:
        """Add or replace the entry of `key` (the most recently used), dropping the least
        recently used one when there are more than `size`."""
        self._entries.pop(key, None)
        self._entries[key] = value
        while len(self._entries) > max(self.size, 1):  # down to the size, also after it was lowered
            self._entries.pop(next(iter(self._entries)), None)

    def pop(self, key: K) -> V | None:
        """Remove the entry of `key`; it, or None when there was none."""
        return self._entries.pop(key, None)

    def values(self) -> list[V]:
        """The entries, least recently used first (not marked used)."""
        return list(self._entries.values())

    def clear(self) -> None:
        """Drop every entry."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries
