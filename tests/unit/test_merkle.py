"""The audit trail's Merkle tree against a literal transcription of RFC 9162 §2.1 (MTH, PATH,
PROOF on lists): the streaming builder and the range-based proofs agree with it for every size
and position up to 40 leaves, the verifiers accept every honest proof and refuse altered ones."""

from __future__ import annotations

import hashlib

import pytest

from arm_common import merkle


def mth(d: list[bytes]) -> bytes:
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return merkle.leaf_hash(d[0])
    k = 1
    while k * 2 < len(d):
        k *= 2
    return hashlib.sha256(b"\x01" + mth(d[:k]) + mth(d[k:])).digest()


def path(m: int, d: list[bytes]) -> list[bytes]:
    if len(d) <= 1:
        return []
    k = 1
    while k * 2 < len(d):
        k *= 2
    return path(m, d[:k]) + [mth(d[k:])] if m < k else path(m - k, d[k:]) + [mth(d[:k])]


def subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    if m == len(d):
        return [] if b else [mth(d)]
    k = 1
    while k * 2 < len(d):
        k *= 2
    return subproof(m, d[:k], b) + [mth(d[k:])] if m <= k else subproof(m - k, d[k:], False) + [mth(d[:k])]


DATA = [hashlib.sha256(str(i).encode()).digest() for i in range(40)]
LEAVES = [merkle.leaf_hash(x) for x in DATA]


def flip(h: bytes) -> bytes:
    return bytes([h[0] ^ 1]) + h[1:]


@pytest.mark.parametrize("n", range(1, 41))
def test_root_and_inclusion_proofs_match_the_rfc(n: int) -> None:
    root = merkle.root_of(LEAVES[:n])
    assert root == mth(DATA[:n])
    for m in range(n):
        proof = merkle.prove(merkle.inclusion_ranges(m, n), LEAVES[:n])
        assert proof == path(m, DATA[:n])
        assert merkle.verify_inclusion(LEAVES[m], m, n, proof, root)
        assert not merkle.verify_inclusion(flip(LEAVES[m]), m, n, proof, root)
        assert not merkle.verify_inclusion(LEAVES[m], m, n, proof, flip(root))
        if n > 1:
            assert not merkle.verify_inclusion(LEAVES[m], (m + 1) % n, n, proof, root)
            assert not merkle.verify_inclusion(LEAVES[m], m, n, [flip(proof[0])] + proof[1:], root)
            assert not merkle.verify_inclusion(LEAVES[m], m, n, proof[:-1], root)
    assert not merkle.verify_inclusion(LEAVES[0], n, n, [], root)


@pytest.mark.parametrize("n", range(1, 41))
def test_consistency_proofs_match_the_rfc(n: int) -> None:
    second = merkle.root_of(LEAVES[:n])
    for m in range(1, n + 1):
        first = merkle.root_of(LEAVES[:m])
        proof = merkle.prove(merkle.consistency_ranges(m, n), LEAVES[:n])
        assert proof == (subproof(m, DATA[:n], True) if m < n else [])
        assert merkle.verify_consistency(m, n, proof, first, second)
        if m < n:
            assert not merkle.verify_consistency(m, n, proof, flip(first), second)
            assert not merkle.verify_consistency(m, n, proof, first, flip(second))
            assert not merkle.verify_consistency(m, n, [flip(proof[0])] + proof[1:], first, second)
            # A different history of the first m leaves never yields a valid proof.
            other = [flip(LEAVES[0])] + LEAVES[1:n]
            assert not merkle.verify_consistency(m, n, merkle.prove(merkle.consistency_ranges(m, n), other),
                                                 first, merkle.root_of(other))
