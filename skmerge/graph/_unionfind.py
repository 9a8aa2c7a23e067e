"""Union-find over integer elements: plain, and with a parity bit per element.

The parity version records, for every element, whether it is the element its
set stands for or that element's *dual*. The walker uses it for the two ways
two channels can be tied: the same channel (parity 0, a residual addition) or
dual channels (parity 1: a query and the key it is multiplied with, which must
transform with a map and its inverse transpose so that ``q k^T`` is unchanged).
A set in which some element is tied to its own dual only admits maps equal to
their inverse transpose: orthogonal maps (a weight tied between an embedding
and an output layer).
"""

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


class ParityUnionFind:
    """Disjoint sets whose elements carry a parity relative to their set.

    ``union(a, b, parity)`` states ``a == b`` (parity 0) or ``a == dual(b)``
    (parity 1). A set that receives contradicting statements is marked
    *conflicted* (:meth:`conflicted`): it holds an element equal to its own dual.
    """

    def __init__(self):
        self._parent: list[int] = []
        self._parity: list[int] = []  # parity of an element relative to its parent
        self._size: list[int] = []
        self._conflict: list[bool] = []

    def add(self, n: int = 1) -> int:
        """Create ``n`` new singleton sets; return the first new element."""
        first = len(self._parent)
        self._parent.extend(range(first, first + n))
        self._parity.extend([0] * n)
        self._size.extend([1] * n)
        self._conflict.extend([False] * n)
        return first

    def __len__(self) -> int:
        return len(self._parent)

    def find(self, x: int) -> tuple[int, int]:
        """Return ``(representative, parity of x relative to it)``."""
        parent, parity = self._parent, self._parity
        path = []
        while parent[x] != x:
            path.append(x)
            x = parent[x]
        root, acc = x, 0
        for node in reversed(path):  # compress, accumulating parities from the root down
            acc ^= parity[node]
            parity[node] = acc
            parent[node] = root
        return root, (parity[path[0]] if path else 0)

    def union(self, a: int, b: int, parity: int = 0) -> int:
        """State ``a == b`` (``parity=0``) or ``a == dual(b)`` (``parity=1``)."""
        (ra, pa), (rb, pb) = self.find(a), self.find(b)
        if ra == rb:
            if pa ^ pb != parity:
                self._conflict[ra] = True
            return ra
        if self._size[ra] < self._size[rb]:
            ra, rb, pa, pb = rb, ra, pb, pa
        self._parent[rb] = ra
        self._parity[rb] = pa ^ pb ^ parity
        self._size[ra] += self._size[rb]
        self._conflict[ra] = self._conflict[ra] or self._conflict[rb]
        return ra

    def conflicted(self, x: int) -> bool:
        """Whether the set of ``x`` holds an element tied to its own dual."""
        return self._conflict[self.find(x)[0]]
