"""Union-find over tensor axes, for tracing permutation specs.

Every axis of every tensor the tracer sees (activations, parameters, buffers) is one element. `join`
says two axes must carry the same permutation; `pin` says an axis must not be permuted (and why);
`set_block(x, y, k)` says axis x (n·k units) is permuted as axis y (n units) in blocks of k (a
flatten: index c·k + j moves to p[c]·k + j). A group is pinned when any element is, and pins travel
both ways along block links (x's permutation is y's, expanded). Joining two groups blocked over
different sizes pins both: safe, never a guess.
"""
from __future__ import annotations


class AxisGroups:
    def __init__(self) -> None:
        self._parent: list[int] = []
        self.size: list[int] = []
        self._pin_reason: dict[int, str] = {}  # root -> why its group is pinned (first reason given)
        self._block: dict[int, tuple[int, int]] = {}  # root -> (element y, k): this group is y's in blocks of k

    def new(self, size: int) -> int:
        self._parent.append(len(self._parent))
        self.size.append(int(size))
        return len(self._parent) - 1

    def find(self, e: int) -> int:
        root = e
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[e] != root:  # path compression
            self._parent[e], e = root, self._parent[e]
        return root

    def pin(self, e: int, reason: str) -> None:
        self._pin_reason.setdefault(self.find(e), reason)

    def join(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:  # a handler bug would land here: refuse rather than guess
            self.pin(ra, "axes of different sizes met")
            self.pin(rb, "axes of different sizes met")
            return
        self._parent[rb] = ra
        if rb in self._pin_reason:
            self._pin_reason.setdefault(ra, self._pin_reason.pop(rb))
        block_a, block_b = self._block.pop(ra, None), self._block.pop(rb, None)
        if block_a and block_b:
            self._block[ra] = block_a
            if block_a[1] == block_b[1]:
                self.join(block_a[0], block_b[0])
            else:
                self.pin(ra, "two different block layouts met")
                self.pin(block_b[0], "two different block layouts met")
        elif block_a or block_b:
            self._block[ra] = block_a or block_b

    def set_block(self, x: int, y: int, k: int) -> None:
        """Axis x (size n·k) is axis y (size n) permuted in blocks of k."""
        if k == 1:
            self.join(x, y)
            return
        if self.size[x] != self.size[y] * k:
            self.pin(x, "axes of different sizes met")
            self.pin(y, "axes of different sizes met")
            return
        rx = self.find(x)
        if rx in self._block:
            y_old, k_old = self._block[rx]
            if k_old == k:
                self.join(y, y_old)
            else:
                self.pin(x, "two different block layouts met")
                self.pin(y, "two different block layouts met")
            return
        self._block[rx] = (y, k)

    def resolve(self) -> "ResolvedGroups":
        """Spread pins along block links (both ways) until nothing changes; then read off the result."""
        changed = True
        while changed:
            changed = False
            for rx, (y, _) in list(self._block.items()):
                ry = self.find(y)
                reasons = [self._pin_reason[r] for r in (rx, ry) if r in self._pin_reason]
                if reasons and not (rx in self._pin_reason and ry in self._pin_reason):
                    self.pin(rx, reasons[0])
                    self.pin(ry, reasons[0])
                    changed = True
        return ResolvedGroups(self)


class ResolvedGroups:
    """The groups after `AxisGroups.resolve`: for each element, why it is pinned, or its base group
    (the group whose permutation it carries) and block size."""

    def __init__(self, groups: AxisGroups):
        self._g = groups

    def pinned(self, e: int) -> str | None:
        return self._g._pin_reason.get(self._g.find(e))

    def base(self, e: int) -> tuple[int, int]:
        """(root of the unblocked group whose permutation axis e carries, block size)."""
        root, k = self._g.find(e), 1
        while root in self._g._block:
            y, kk = self._g._block[root]
            root, k = self._g.find(y), k * kk
        return root, k

    def units(self, e: int) -> int:
        """Number of units of e's base permutation (1: nothing to permute)."""
        return self._g.size[self.base(e)[0]]
