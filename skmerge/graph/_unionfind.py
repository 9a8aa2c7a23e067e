"""A tiny union-find over integer elements (path halving, union by size)."""

from __future__ import annotations


class UnionFind:
    """Disjoint sets of the integers ``0 .. n-1``, grown with :meth:`add`."""

    def __init__(self):
        self._parent: list[int] = []
        self._size: list[int] = []

    def add(self) -> int:
        """Create a new singleton set and return its element."""
        self._parent.append(len(self._parent))
        self._size.append(1)
        return len(self._parent) - 1

    def __len__(self) -> int:
        return len(self._parent)

    def find(self, x: int) -> int:
        """Return the representative of the set holding ``x``."""
        parent = self._parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> int:
        """Merge the sets of ``a`` and ``b``; return the new representative."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self._size[ra] < self._size[rb]:
            ra, rb = rb, ra
        self._parent[rb] = ra
        self._size[ra] += self._size[rb]
        return ra

    def same(self, a: int, b: int) -> bool:
        """Whether ``a`` and ``b`` are in one set."""
        return self.find(a) == self.find(b)
