"""Index samplers: infinite seeded training streams (plain and repeat-factor) and inference shards.

A training stream is the concatenation, epoch after epoch, of a seeded random ordering of the
dataset (for repeat-factor sampling: of the dataset with images repeated). The ordering of epoch
``e`` depends only on ``(seed, e)``, so any position of the stream can be recomputed without
replaying it. With ``world_size`` processes, process ``rank`` takes the global positions
``rank, rank + world_size, ...``: within an epoch every process sees different entries, and the
position of a process is a single integer (the samples it has consumed), which is what makes
loaders resumable.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = [
    "InferenceSampler",
    "InfiniteSampler",
    "RepeatFactorTrainingSampler",
    "TrainingSampler",
    "mix_seed",
    "repeat_factors_from_category_frequency",
    "resolve_rank_world_size",
]

logger = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """Hashes integers into one 63-bit seed (splitmix64 chain).

    Neighbouring inputs (epoch 3 vs 4, sample 100 vs 101) give unrelated seeds, which plain
    ``seed + i`` does not guarantee.
    """
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


def resolve_rank_world_size(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Fills missing rank / world size from ``torch.distributed`` (1 process when not initialized)."""
    initialized = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def _generator(*seed_parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*seed_parts))


class InfiniteSampler(Sampler[int]):
    """Base class of the infinite training streams (subclasses define one epoch's ordering).

    Args:
        seed: seed of the orderings; must be the same on every process.
        rank: this process (default: torch.distributed rank, or 0).
        world_size: number of processes (default: torch.distributed world size, or 1).
        start: samples this process has already consumed; iteration resumes after them.
    """

    def __init__(
        self,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        start: int = 0,
    ) -> None:
        self.seed = int(seed)
        self.rank, self.world_size = resolve_rank_world_size(rank, world_size)
        self.start = int(start)

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """Dataset indices of epoch ``epoch`` of the global stream, LongTensor[L_epoch]."""
        raise NotImplementedError

    def epoch_length(self, epoch: int) -> int:
        return len(self.epoch_indices(epoch))

    def iter_with_positions(self) -> Iterator[tuple[int, int]]:
        """Yields ``(dataset index, global stream position)`` forever, starting at ``start``.

        The global position is unique across processes and steps, and is the same every time
        the stream is replayed; loaders derive the sample's augmentation seed from it.
        """
        pos = self.start * self.world_size + self.rank
        epoch, epoch_begin = 0, 0
        length = self.epoch_length(0)
        while pos >= epoch_begin + length:  # seek: skip whole epochs without materializing them
            epoch_begin += length
            epoch += 1
            length = self.epoch_length(epoch)
        while True:
            indices = self.epoch_indices(epoch).tolist()
            while pos < epoch_begin + len(indices):
                yield indices[pos - epoch_begin], pos
                pos += self.world_size
            epoch_begin += len(indices)
            epoch += 1

    def __iter__(self) -> Iterator[int]:
        for index, _ in self.iter_with_positions():
            yield index


class TrainingSampler(InfiniteSampler):
    """Infinite stream of seeded random permutations of ``range(size)``, one per epoch."""

    def __init__(
        self,
        size: int,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        start: int = 0,
        shuffle: bool = True,
    ) -> None:
        if size <= 0:
            raise ValueError(f"cannot sample from an empty dataset (size={size})")
        super().__init__(seed, rank, world_size, start)
        self.size, self.shuffle = int(size), shuffle

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        return torch.randperm(self.size, generator=_generator(self.seed, epoch))

    def epoch_length(self, epoch: int) -> int:
        return self.size


class RepeatFactorTrainingSampler(InfiniteSampler):
    """Infinite stream where image ``i`` appears about ``repeat_factors[i]`` times per epoch.

    Each epoch rounds every factor stochastically (``floor(r)`` plus one more with probability
    ``r - floor(r)``; LVIS, Gupta et al. 2019), repeats the indices and shuffles them, all from a
    generator seeded by ``(seed, epoch)``.

    Args:
        repeat_factors: float Tensor[N] (>= 0), e.g. from
            :func:`repeat_factors_from_category_frequency`.
    """

    def __init__(
        self,
        repeat_factors: torch.Tensor | Sequence[float],
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        start: int = 0,
    ) -> None:
        super().__init__(seed, rank, world_size, start)
        factors = torch.as_tensor(repeat_factors, dtype=torch.float64)
        if factors.ndim != 1 or len(factors) == 0 or bool((factors < 0).any()):
            raise ValueError("repeat_factors must be a non-empty 1-D tensor of values >= 0")
        if float(factors.sum()) <= 0:
            raise ValueError("repeat_factors are all zero: nothing to sample")
        self._int_part = factors.floor()
        self._frac_part = factors - self._int_part
        self._cache: tuple[tuple[int, int], torch.Tensor] | None = None

    def _repeats(self, gen: torch.Generator) -> torch.Tensor:
        extra = torch.rand(len(self._frac_part), generator=gen, dtype=torch.float64)
        return (self._int_part + (extra < self._frac_part).double()).long()

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        key = (self.seed, epoch)  # the seed can change when a loader restores its state
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        gen = _generator(self.seed, epoch)
        repeats = self._repeats(gen)
        # numpy: torch.repeat_interleave costs ~10 ms per call on CPU, even for 20 items.
        indices = torch.from_numpy(np.repeat(np.arange(len(repeats)), repeats.numpy()))
        indices = indices[torch.randperm(len(indices), generator=gen)]
        if len(indices) == 0:  # all factors < 1 and unlucky draws: keep the stream alive
            indices = torch.multinomial(self._int_part + self._frac_part, 1, generator=gen)
        self._cache = (key, indices)
        return indices

    def epoch_length(self, epoch: int) -> int:
        return len(self.epoch_indices(epoch))


def repeat_factors_from_category_frequency(
    records: Sequence[Mapping[str, Any]], threshold: float
) -> torch.Tensor:
    """LVIS repeat factors: ``r(image) = max over its categories c of max(1, sqrt(t / f(c)))``.

    ``f(c)`` is the fraction of images that contain category ``c``. Crowd regions are not
    training targets, so they do not count. An image without annotations gets 1.

    Args:
        records: dataset records with ``annotations`` (``category_id``, ``iscrowd``).
        threshold: ``t`` (``DATALOADER.REPEAT_THRESHOLD``); categories rarer than ``t`` repeat.

    Returns:
        float64 Tensor[len(records)] of repeat factors (>= 1).
    """
    if threshold <= 0:
        raise ValueError(f"REPEAT_THRESHOLD must be > 0, got {threshold}")
    per_image = [
        {a["category_id"] for a in r.get("annotations", ()) if not a.get("iscrowd", 0)}
        for r in records
    ]
    counts: dict[int, int] = {}
    for cats in per_image:
        for c in cats:
            counts[c] = counts.get(c, 0) + 1
    n = max(len(records), 1)
    cat_factor = {c: max(1.0, math.sqrt(threshold / (k / n))) for c, k in counts.items()}
    factors = [max((cat_factor[c] for c in cats), default=1.0) for cats in per_image]
    return torch.tensor(factors, dtype=torch.float64)


class InferenceSampler(Sampler[int]):
    """Finite, ordered shard of ``range(size)`` for this process (contiguous, sizes differ by <= 1).

    Concatenating the shards of ranks ``0..world_size-1`` gives ``range(size)`` exactly once.
    """

    def __init__(self, size: int, rank: int | None = None, world_size: int | None = None) -> None:
        self.size = int(size)
        self.rank, self.world_size = resolve_rank_world_size(rank, world_size)
        per, rest = divmod(self.size, self.world_size)
        self.begin = self.rank * per + min(self.rank, rest)
        self.end = self.begin + per + (1 if self.rank < rest else 0)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.begin, self.end))

    def __len__(self) -> int:
        return self.end - self.begin
