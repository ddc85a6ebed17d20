"""A Merkle tree over a tenant's change records, as transparency logs build them (RFC 9162 §2.1):
one record can be proved part of a signed checkpoint (inclusion proof) and a later checkpoint
proved to extend an earlier one (consistency proof) without exporting the trail.

The leaves are the records in sequence order, leaf i (0-based) being record i + 1; a leaf's data
is the 32 bytes of the record's `hash`. Leaf hash = SHA-256(0x00 ‖ data), interior node =
SHA-256(0x01 ‖ left ‖ right); the tree over n leaves splits at the largest power of two below n.
Hashes travel as lowercase hex.

Every node a proof holds is the root of a contiguous range of leaves, so the server computes a
proof in one streaming pass over the leaves (`proof_ranges` + `RangeFolder`), in memory
logarithmic in the trail's size."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def leaf_of(record_hash_hex: str) -> bytes:
    """The leaf hash of a record, from its hex `hash`."""
    return leaf_hash(bytes.fromhex(record_hash_hex))


def _split(n: int) -> int:
    """The largest power of two smaller than n (n ≥ 2)."""
    return 1 << ((n - 1).bit_length() - 1)


class TreeBuilder:
    """Folds leaf hashes in order into the roots of perfect subtrees (at most log2 n of them);
    `root()` is the tree hash of everything added. The state is small enough to walk a trail of
    any size, and two builders fed the same leaves agree."""

    def __init__(self) -> None:
        self.size = 0
        self._stack: list[tuple[int, bytes]] = []  # (leaves under it, hash), left to right

    def add(self, leaf: bytes) -> None:
        self.size += 1
        size, h = 1, leaf
        while self._stack and self._stack[-1][0] == size:
            left = self._stack.pop()[1]
            size, h = size * 2, node_hash(left, h)
        self._stack.append((size, h))

    def state(self) -> list[list[int | str]]:
        """The builder's state as JSON-able [size, hex hash] pairs (to resume from later)."""
        return [[size, h.hex()] for size, h in self._stack]

    @classmethod
    def resume(cls, state: Sequence[Sequence[int | str]]) -> TreeBuilder:
        """A builder continuing from `state()`; raises ValueError when it is malformed."""
        builder = cls()
        sizes = []
        for size, h in state:
            if not isinstance(size, int) or size < 1 or size & (size - 1) or not isinstance(h, str):
                raise ValueError("malformed tree state")
            sizes.append(size)
            builder._stack.append((size, bytes.fromhex(h)))
        if sizes != sorted(sizes, reverse=True) or len(set(sizes)) != len(sizes):
            raise ValueError("malformed tree state")
        builder.size = sum(sizes)
        return builder

    def root(self) -> bytes:
        if not self._stack:
            return hashlib.sha256(b"").digest()  # RFC 9162: the empty tree's hash
        h = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            h = node_hash(left, h)
        return h


def root_of(leaves: Iterable[bytes]) -> bytes:
    builder = TreeBuilder()
    for leaf in leaves:
        builder.add(leaf)
    return builder.root()


# --- proofs as ranges of leaves ------------------------------------------------------------------

def inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """The leaf ranges [start, end) whose roots form the inclusion proof of leaf `index` in the
    tree of `size` leaves, in proof order (RFC 9162 PATH)."""
    if not 0 <= index < size:
        raise ValueError("index must be below size")
    out: list[tuple[int, int]] = []

    def path(m: int, lo: int, hi: int) -> None:
        n = hi - lo
        if n <= 1:
            return
        k = _split(n)
        if m < k:
            path(m, lo, lo + k)
            out.append((lo + k, hi))
        else:
            path(m - k, lo + k, hi)
            out.append((lo, lo + k))
    path(index, 0, size)
    return out


def consistency_ranges(first: int, second: int) -> list[tuple[int, int]]:
    """The leaf ranges whose roots form the consistency proof from the tree of `first` leaves
    to the tree of `second` (RFC 9162 PROOF); empty when first == second."""
    if not 0 < first <= second:
        raise ValueError("need 0 < first <= second")
    out: list[tuple[int, int]] = []

    def subproof(m: int, lo: int, hi: int, whole: bool) -> None:
        n = hi - lo
        if m == n:
            if not whole:
                out.append((lo, hi))
            return
        k = _split(n)
        if m <= k:
            subproof(m, lo, lo + k, whole)
            out.append((lo + k, hi))
        else:
            subproof(m - k, lo + k, hi, False)
            out.append((lo, lo + k))
    subproof(first, 0, second, True)
    return out


class RangeFolder:
    """Computes the roots of the given leaf ranges in one pass over leaves fed in order."""

    def __init__(self, ranges: Sequence[tuple[int, int]]) -> None:
        self.ranges = list(ranges)
        self._builders = [TreeBuilder() for _ in ranges]
        self._next = 0

    def add(self, leaf: bytes) -> None:
        i = self._next
        for (lo, hi), builder in zip(self.ranges, self._builders, strict=True):
            if lo <= i < hi:
                builder.add(leaf)
        self._next += 1

    def roots(self) -> list[bytes]:
        for (lo, hi), builder in zip(self.ranges, self._builders, strict=True):
            if builder.size != hi - lo:
                raise ValueError(f"leaves {lo}..{hi} were not all given")
        return [b.root() for b in self._builders]


def prove(ranges: Sequence[tuple[int, int]], leaves: Iterable[bytes]) -> list[bytes]:
    folder = RangeFolder(ranges)
    for leaf in leaves:
        folder.add(leaf)
    return folder.roots()


# --- verification (RFC 9162 §2.1.3.2 and §2.1.4.2) -----------------------------------------------

def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """Whether `proof` shows leaf `index` with hash `leaf` is in the tree of `size` leaves with `root`."""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(first: int, second: int, proof: Sequence[bytes], first_root: bytes,
                       second_root: bytes) -> bool:
    """Whether `proof` shows the tree of `second` leaves with `second_root` extends the tree of
    `first` leaves with `first_root` (every earlier leaf unchanged)."""
    if not 0 < first <= second:
        return False
    if first == second:
        return not proof and first_root == second_root
    if not proof:
        return False
    path = list(proof)
    if first & (first - 1) == 0:  # a power of two: the first tree is a node of the second
        path.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == first_root and sr == second_root and sn == 0
