"""Which sample the job sees at each global position: shuffle, epochs and mixtures, in O(1).

Nothing here depends on the corpus size beyond a few integers: the shuffle is a keyed Feistel
permutation evaluated per index (no index array, no start-up pass), and the mixture is a fixed
interleaving pattern of one block of slots, repeated.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

MASK64 = (1 << 64) - 1
FEISTEL_ROUNDS = 4  # Luby-Rackoff: four rounds of a good round function give a strong permutation
MIXTURE_BLOCK = 10_000  # weights are quantised to 1/10000, each component's share is exact per block


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a cheap, well-distributed 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


class FeistelPermutation:
    """A pseudo-random permutation of range(n), evaluated at any index in O(1) expected time.

    A balanced Feistel network permutes range(2**bits) (bits even, 2**bits < 4n); cycle-walking
    (re-encrypting until the value falls below n) restricts it to range(n) and stays a bijection.
    The expected number of walks is below 4, so one lookup costs a handful of integer hashes.
    """

    def __init__(self, n: int, key: bytes) -> None:
        if n < 1:
            raise ValueError(f"permutation of an empty range (n={n})")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = (1 << self.half) - 1
        digest = hashlib.blake2b(key, digest_size=8 * FEISTEL_ROUNDS).digest()
        self.keys = [int.from_bytes(digest[8 * r: 8 * r + 8], "little") for r in range(FEISTEL_ROUNDS)]

    def _encrypt(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix64(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, index: int) -> int:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} outside range({self.n})")
        x = self._encrypt(index)
        while x >= self.n:
            x = self._encrypt(x)
        return x


class MixtureSchedule:
    """Deterministic assignment of global slots to components in proportion to weights.

    Each block of ``block`` slots gives component c exactly q_c slots (largest-remainder
    rounding of w_c * block), interleaved smoothly: slot j goes to the component furthest
    behind its quota. Slot g -> (component, that component's local index) is then O(1):
    (g // block) * q_c + (rank of g % block among c's slots in the pattern).
    """

    def __init__(self, weights: list[float], block: int = MIXTURE_BLOCK) -> None:
        if not weights or any(not w > 0 for w in weights):
            raise ValueError(f"mixture weights must be positive, got {weights}")
        self.block = 1 if len(weights) == 1 else block
        self.quotas = _largest_remainder(weights, self.block)
        self.pattern: list[int] = []
        self.rank: list[int] = []
        assigned = [0] * len(weights)
        for j in range(self.block):
            c = max((c for c in range(len(weights)) if assigned[c] < self.quotas[c]),
                    key=lambda c: ((j + 1) * self.quotas[c] / self.block - assigned[c], -c))
            self.pattern.append(c)
            self.rank.append(assigned[c])
            assigned[c] += 1

    def __call__(self, slot: int) -> tuple[int, int]:
        block, offset = divmod(slot, self.block)
        component = self.pattern[offset]
        return component, block * self.quotas[component] + self.rank[offset]


def _largest_remainder(weights: list[float], total: int) -> list[int]:
    norm = sum(weights)
    exact = [w / norm * total for w in weights]
    quotas = [max(1, int(e)) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda c: (-(exact[c] - int(exact[c])), c))
    i = 0
    while sum(quotas) < total:
        quotas[by_remainder[i % len(weights)]] += 1
        i += 1
    while sum(quotas) > total:  # only when tiny weights were raised to one slot
        quotas[max(range(len(quotas)), key=lambda c: quotas[c])] -= 1
    return quotas


class GlobalSampler:
    """Global sample position -> (component, sample index within that component's epoch order).

    Component c's k-th slot is in its epoch k // n_c, at position k % n_c of that epoch's
    permutation, keyed by (seed, c, epoch): every epoch is a fresh shuffle, and a component that
    is drawn faster than others simply starts its next epoch sooner.
    """

    def __init__(self, sizes: list[int], weights: list[float], seed: int) -> None:
        self.sizes, self.seed = list(sizes), seed
        self.mixture = mixture_schedule(tuple(weights))
        # The number of global samples "an epoch" stands for in state_dict/logs: one pass over
        # the corpus for a single corpus, the sum of the components' samples for a mixture.
        self.samples_per_epoch = sum(self.sizes)

    def __call__(self, position: int) -> tuple[int, int]:
        component, local = self.mixture(position)
        epoch, offset = divmod(local, self.sizes[component])
        return component, _permutation(self.sizes[component], self.seed, component, epoch)(offset)


@lru_cache(maxsize=64)
def _permutation(n: int, seed: int, component: int, epoch: int) -> FeistelPermutation:
    return FeistelPermutation(n, f"strata-shuffle:{seed}:{component}:{epoch}".encode())


@lru_cache(maxsize=8)
def mixture_schedule(weights: tuple[float, ...]) -> MixtureSchedule:
    return MixtureSchedule(list(weights))
