"""Batched loaders: infinite, seeded, distributed-aware and resumable training streams, and
finite sharded inference loaders.

Resuming exactly: the sampler gives each sample a global stream position, and the sample's
augmentation is seeded by ``(seed, position)``. A batch is therefore a pure function of the
seed and of how many samples the process has consumed, whatever the number of worker processes
and however far they had prefetched; :meth:`InfiniteLoader.state_dict` saves that count.
"""

from __future__ import annotations

import copy
import logging
import pickle
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from .mapper import build_test_mapper, build_train_mapper, build_unlabeled_mapper
from .samplers import (
    InferenceSampler,
    InfiniteSampler,
    RepeatFactorTrainingSampler,
    TrainingSampler,
    mix_seed,
    repeat_factors_from_category_frequency,
    resolve_rank_world_size,
)
from .validation import DataError

__all__ = [
    "InfiniteLoader",
    "MappedDataset",
    "SerializedList",
    "build_test_loader",
    "build_train_loader",
    "build_unlabeled_loader",
    "trivial_batch_collator",
]

logger = logging.getLogger(__name__)

# Stream tags keep the labeled and unlabeled streams (and augmentation seeds) independent
# when they share the run's seed.
_LABELED_STREAM, _UNLABELED_STREAM, _AUGMENTATION = 1, 2, 3
# With DATALOADER.SKIP_BAD_RECORDS, give up after this many unreadable records in a row.
_MAX_SKIPS = 20


def trivial_batch_collator(batch: list[dict]) -> list[dict]:
    """A batch is the list of per-image dicts (images differ in size before padding)."""
    return batch


class SerializedList:
    """Records pickled into one numpy buffer.

    Worker processes forked from the main one would otherwise touch (and so copy) every Python
    object of a large record list through reference counting; one flat buffer is shared as is.
    """

    def __init__(self, items: Sequence[Any]) -> None:
        blobs = [
            np.frombuffer(pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
            for x in items
        ]
        self._offsets = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        self._buffer = np.concatenate(blobs) if blobs else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, i: int) -> Any:
        begin = int(self._offsets[i - 1]) if i > 0 else 0
        return pickle.loads(memoryview(self._buffer[begin : int(self._offsets[i])]))


class MappedDataset(Dataset):
    """``dataset[(index, seed)] = mapper(records[index], seed)``; a plain int means seed None.

    Args:
        records: dataset records.
        mapper: ``mapper(record, seed) -> dict``.
        skip_bad: when a record's image cannot be read (:class:`DataError`), log it and use the
            next record instead (same seed, so the stream stays deterministic); else raise.
    """

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        mapper: Callable[..., dict],
        skip_bad: bool = False,
    ) -> None:
        self.records = records if isinstance(records, SerializedList) else SerializedList(records)
        self.mapper = mapper
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int | None]) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, None)
        for attempt in range(min(len(self.records), _MAX_SKIPS)):
            try:
                sample = self.mapper(self.records[(index + attempt) % len(self.records)], seed)
                break
            except DataError as e:
                if not self.skip_bad:
                    raise
                logger.warning(
                    "Skipping a bad record at load time (DATALOADER.SKIP_BAD_RECORDS): %s", e
                )
        else:
            raise RuntimeError(f"{_MAX_SKIPS} consecutive records could not be read; giving up")
        if get_worker_info() is not None:
            _pack_masks(sample)
        return sample


# Sending a sample from a worker process copies every tensor through shared memory; a bool
# mask costs a byte per pixel there, 8x more than its bits. Workers send packed bits and the
# loader unpacks them in the training process (cheap), which roughly doubles throughput.
_PACKED = "_packed_masks"


def _pack_masks(sample: dict) -> None:
    instances = sample.get("instances")
    if instances is None or instances["masks"].dtype != torch.bool:
        return
    masks = instances.pop("masks")
    packed = np.packbits(masks.numpy(), axis=-1)
    instances[_PACKED] = (torch.from_numpy(packed), masks.shape[-1])


def _unpack_masks(sample: dict) -> None:
    instances = sample.get("instances")
    if instances is None or _PACKED not in instances:
        return
    packed, width = instances.pop(_PACKED)
    bits = np.unpackbits(packed.numpy(), axis=-1, count=width)
    instances["masks"] = torch.from_numpy(bits.view(np.bool_))


class _SeededBatches(Sampler[list[tuple[int, int]]]):
    """Groups an infinite sampler's output into batches of ``(index, augmentation seed)``."""

    def __init__(self, sampler: InfiniteSampler, batch_size: int) -> None:
        self.sampler, self.batch_size = sampler, batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batch = []
        for index, pos in self.sampler.iter_with_positions():
            batch.append((index, mix_seed(self.sampler.seed, _AUGMENTATION, pos)))
            if len(batch) == self.batch_size:
                yield batch
                batch = []


class InfiniteLoader:
    """Infinite batched training loader that can save and restore its position.

    ``iter(loader)`` starts worker processes and yields batches (lists of ``batch_size`` dicts)
    from the current position on. :meth:`state_dict` / :meth:`load_state_dict` save and restore
    the position; a restored loader yields exactly the batches the original would have yielded
    next (same images, same augmentations), with or without worker processes. Restoring
    invalidates iterators created before.

    Args:
        records: dataset records.
        mapper: ``mapper(record, seed) -> dict``.
        sampler: an infinite sampler (its ``seed``, ``rank``, ``world_size`` are used).
        batch_size: images per batch for this process.
        num_workers: worker processes (0: load in the calling process).
        pin_memory: pin batches in page-locked memory (faster host-to-GPU copies).
        skip_bad: replace records whose image cannot be read by the next one (logged).
    """

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        mapper: Callable[..., dict],
        sampler: InfiniteSampler,
        batch_size: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        skip_bad: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = MappedDataset(records, mapper, skip_bad)
        self.sampler = sampler
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.num_samples = 0  # samples this process has consumed
        self._generation = 0

    def state_dict(self) -> dict[str, int]:
        """Position of the stream: ``{"num_samples", "seed", "world_size"}`` (this process)."""
        return {
            "num_samples": self.num_samples,
            "seed": self.sampler.seed,
            "world_size": self.sampler.world_size,
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from a saved position; the saved seed replaces the current one."""
        num_samples = int(state["num_samples"])
        saved_world = int(state.get("world_size", self.sampler.world_size))
        if saved_world != self.sampler.world_size:
            # Keep the global position; the split between processes cannot be kept exactly.
            num_samples = num_samples * saved_world // self.sampler.world_size
            logger.warning(
                "Resuming a data stream saved with %d processes on %d: batches will not match "
                "the interrupted run exactly.",
                saved_world,
                self.sampler.world_size,
            )
        self.sampler.seed = int(state.get("seed", self.sampler.seed))
        self.num_samples = num_samples
        self._generation += 1

    def _dataloader(self) -> DataLoader:
        sampler = copy.copy(self.sampler)
        sampler.start = self.num_samples
        return DataLoader(
            self.dataset,
            batch_sampler=_SeededBatches(sampler, self.batch_size),
            num_workers=self.num_workers,
            collate_fn=trivial_batch_collator,
            pin_memory=self.pin_memory,
            # A private generator: creating workers must not draw from the global RNG.
            generator=torch.Generator(),
        )

    def __iter__(self) -> Iterator[list[dict]]:
        self._generation += 1
        generation = self._generation
        for batch in self._dataloader():
            if generation != self._generation:
                raise RuntimeError(
                    "This loader iterator is stale: the loader was restored or iterated again."
                )
            for sample in batch:
                _unpack_masks(sample)
            self.num_samples += len(batch)
            yield batch


def _resolve_seed(seed: int) -> int:
    """A negative seed means "random": draw one on rank 0 and share it with every process."""
    if seed >= 0:
        return seed
    drawn = [secrets.randbits(31)]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(drawn, src=0)
    logger.info("Data seed drawn at random: %d (saved with the loader state)", drawn[0])
    return drawn[0]


def _per_process_batch(global_batch: int, world_size: int, key: str) -> int:
    if global_batch < world_size or global_batch % world_size:
        raise ValueError(
            f"{key}={global_batch} is the global batch and must be a positive multiple of the "
            f"number of processes ({world_size})"
        )
    return global_batch // world_size


def _train_sampler(
    cfg: Any, records: Sequence[Mapping[str, Any]], seed: int, rank: int, world_size: int
) -> InfiniteSampler:
    name = cfg.DATALOADER.SAMPLER_TRAIN
    if name == "TrainingSampler":
        return TrainingSampler(len(records), seed, rank, world_size)
    if name == "RepeatFactorTrainingSampler":
        factors = repeat_factors_from_category_frequency(
            records, float(cfg.DATALOADER.REPEAT_THRESHOLD)
        )
        logger.info(
            "Repeat-factor sampling: %.1f images per epoch instead of %d (max factor %.2f)",
            float(factors.sum()),
            len(records),
            float(factors.max()),
        )
        return RepeatFactorTrainingSampler(factors, seed, rank, world_size)
    raise ValueError(
        f"DATALOADER.SAMPLER_TRAIN {name!r} is unknown; "
        "allowed: TrainingSampler, RepeatFactorTrainingSampler"
    )


def build_train_loader(
    cfg: Any,
    records: Sequence[Mapping[str, Any]],
    metadata: Mapping[str, Any] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    seed: int | None = None,
) -> InfiniteLoader:
    """Labeled training stream: ``SOLVER.IMS_PER_BATCH / world_size`` images per batch.

    Args:
        cfg: config (INPUT.*, DATALOADER.*, SOLVER.IMS_PER_BATCH, SEED).
        records: labeled dataset records.
        metadata: dataset metadata (only used for messages).
        rank, world_size: default to torch.distributed (or a single process).
        seed: overrides ``cfg.SEED`` (negative: drawn at random, shared across processes).
    """
    if not records:
        name = (metadata or {}).get("name", "the labeled dataset")
        raise ValueError(f"{name} has no records to train on")
    rank, world_size = resolve_rank_world_size(rank, world_size)
    seed = mix_seed(_resolve_seed(int(cfg.SEED if seed is None else seed)), _LABELED_STREAM)
    return InfiniteLoader(
        records,
        build_train_mapper(cfg),
        _train_sampler(cfg, records, seed, rank, world_size),
        _per_process_batch(int(cfg.SOLVER.IMS_PER_BATCH), world_size, "SOLVER.IMS_PER_BATCH"),
        num_workers=int(cfg.DATALOADER.NUM_WORKERS),
        pin_memory=torch.cuda.is_available(),
        skip_bad=bool(cfg.DATALOADER.SKIP_BAD_RECORDS),
    )


def build_unlabeled_loader(
    cfg: Any,
    records: Sequence[Mapping[str, Any]],
    rank: int | None = None,
    world_size: int | None = None,
    seed: int | None = None,
) -> InfiniteLoader:
    """Unlabeled stream of weak/strong view pairs: a plain infinite shuffled stream.

    The global batch is ``SSL.IMS_PER_BATCH_UNLABELED`` (-1: ``SOLVER.IMS_PER_BATCH``).
    """
    if not records:
        raise ValueError("the unlabeled dataset has no images")
    rank, world_size = resolve_rank_world_size(rank, world_size)
    seed = mix_seed(_resolve_seed(int(cfg.SEED if seed is None else seed)), _UNLABELED_STREAM)
    global_batch = int(cfg.SSL.IMS_PER_BATCH_UNLABELED)
    key = "SSL.IMS_PER_BATCH_UNLABELED"
    if global_batch < 0:
        global_batch, key = int(cfg.SOLVER.IMS_PER_BATCH), "SOLVER.IMS_PER_BATCH"
    return InfiniteLoader(
        records,
        build_unlabeled_mapper(cfg),
        TrainingSampler(len(records), seed, rank, world_size),
        _per_process_batch(global_batch, world_size, key),
        num_workers=int(cfg.DATALOADER.NUM_WORKERS),
        pin_memory=torch.cuda.is_available(),
        skip_bad=bool(cfg.DATALOADER.SKIP_BAD_RECORDS),
    )


def build_test_loader(
    cfg: Any,
    records: Sequence[Mapping[str, Any]],
    rank: int | None = None,
    world_size: int | None = None,
) -> DataLoader:
    """Finite, ordered inference loader of ``TEST.IMS_PER_BATCH`` images per batch; process
    ``rank`` gets a contiguous shard."""
    batch_size = int(cfg.TEST.IMS_PER_BATCH)
    if batch_size < 1:
        raise ValueError(f"TEST.IMS_PER_BATCH must be >= 1, got {batch_size}")
    sampler = InferenceSampler(len(records), rank, world_size)
    return DataLoader(
        MappedDataset(records, build_test_mapper(cfg)),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=int(cfg.DATALOADER.NUM_WORKERS),
        collate_fn=trivial_batch_collator,
        generator=torch.Generator(),
    )
