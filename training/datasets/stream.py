"""A deterministic, resumable stream of training batches over any source.

Order: epoch ``e`` visits the source in an order drawn from (seed, e): a permutation for map-style
sources (GeoTIFF crops), a shard permutation plus a seeded shuffle buffer for shards. Samples are
dealt to processes round-robin (sample ``j`` of the epoch goes to rank ``j % world``); each rank
groups its samples into batches that run across epoch boundaries. Every random choice for sample
``j`` of epoch ``e`` (crop position, caption and metadata dropout, temporal frame choice) comes
from a generator seeded with (seed, e, j).

So the stream is a pure function of (seed, rank, world, batch size) and a batch index: resuming at
batch ``b`` gives exactly the batches an uninterrupted run would have seen. Map-style sources skip
to batch ``b`` at once; shard sources re-read (without decoding) the samples before it.

DataLoader workers split the batches: worker ``w`` of ``W`` builds batches ``b`` with
``(b - start) % W == w`` (the DataLoader polls its workers round-robin from worker 0), so the
batches come out in order.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from engine.errors import InvalidRequest

from .samples import Example, Transform, collate
from .shards import iter_tar_samples

__all__ = ["Source", "MapSource", "ShardSource", "TrainingStream", "sample_rng"]


def sample_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The generator of sample ``position`` in epoch ``epoch`` (independent of rank and worker)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(position), 0x5A7])


class Source(Protocol):
    """Anything that lists cheap handles in an epoch order and loads one into an Example."""

    def epoch_handles(self, epoch: int, seed: int, shuffle: bool) -> Iterator[Any]: ...

    def load(self, handle: Any, rng: np.random.Generator) -> Example: ...

    def num_samples(self) -> int: ...  # -1 when unknown (streams)


@dataclass
class MapSource:
    """A source with random access (``len`` and ``load(index, rng)``), e.g.
    :class:`~training.datasets.geotiff.GeoTiffFolder`."""

    dataset: Any

    def num_samples(self) -> int:
        return len(self.dataset)

    def epoch_handles(self, epoch: int, seed: int, shuffle: bool) -> Iterator[int]:
        n = len(self.dataset)
        if not shuffle:
            return iter(range(n))
        order = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 0xE90C]).permutation(n)
        return iter(order.tolist())

    def load(self, handle: int, rng: np.random.Generator) -> Example:
        return self.dataset.load(int(handle), rng)


@dataclass
class ShardSource:
    """Webdataset shards: shard order shuffled per epoch, samples through a seeded shuffle buffer.

    ``parse(sample, rng) -> Example`` decodes one raw sample (see ``samples.parse_*``).
    """

    shards: Sequence[str]
    parse: Callable[[dict, np.random.Generator], Example]
    shuffle_buffer: int = 1000

    def num_samples(self) -> int:
        return -1

    def epoch_handles(self, epoch: int, seed: int, shuffle: bool) -> Iterator[dict]:
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 0x54A2])
        order = rng.permutation(len(self.shards)).tolist() if shuffle else range(len(self.shards))
        samples = itertools.chain.from_iterable(iter_tar_samples(self.shards[i]) for i in order)
        if not shuffle or self.shuffle_buffer <= 1:
            yield from samples
            return
        # Reservoir-style buffer: fill, then emit a random element for each new one.
        buffer: list[dict] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = int(rng.integers(len(buffer)))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def load(self, handle: dict, rng: np.random.Generator) -> Example:
        return self.parse(handle, rng)


@dataclass
class TrainingStream(torch.utils.data.IterableDataset):
    """Endless batches for one process (see the module docstring).

    Yields dicts from :func:`~training.datasets.samples.collate` plus ``"batch_index"``.
    """

    source: Any
    transform: Transform
    batch_size: int
    seed: int = 0
    rank: int = 0
    world: int = 1
    start_batch: int = 0
    shuffle: bool = True

    def __post_init__(self) -> None:
        super().__init__()
        if self.batch_size < 1:
            raise InvalidRequest(f"--batch-size must be at least 1, got {self.batch_size}")

    def _rank_items(self, skip: int) -> Iterator[tuple[int, int, Any]]:
        """(epoch, position, handle) of this rank's samples, from its ``skip``-th sample on."""
        n = self.source.num_samples()
        epoch = 0
        if n > 0:
            per_rank = len(range(self.rank, n, self.world))
            if per_rank == 0:
                raise InvalidRequest(f"the dataset has {n} samples, fewer than the {self.world} processes")
            epoch, skip = divmod(skip, per_rank)
        while True:
            seen = 0
            for position, handle in enumerate(self.source.epoch_handles(epoch, self.seed, self.shuffle)):
                if position % self.world != self.rank:
                    continue
                seen += 1
                if skip > 0:
                    skip -= 1
                    continue
                yield epoch, position, handle
            if seen == 0:
                raise InvalidRequest("the training data yielded no samples for this process; check --data")
            epoch += 1

    def iter_batches(self, worker: int = 0, workers: int = 1) -> Iterator[dict[str, Any]]:
        items = self._rank_items(self.start_batch * self.batch_size)
        for b in itertools.count(self.start_batch):
            chunk = list(itertools.islice(items, self.batch_size))
            if (b - self.start_batch) % workers != worker:  # the DataLoader asks worker 0 first
                continue
            examples = []
            for epoch, position, handle in chunk:
                rng = sample_rng(self.seed, epoch, position)
                examples.append(self.transform(self.source.load(handle, rng), rng))
            batch = collate(examples)
            batch["batch_index"] = b
            batch["epoch"] = chunk[0][0]
            yield batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        if info is None:
            return self.iter_batches()
        return self.iter_batches(info.id, info.num_workers)


def first_examples(source: Any, transform: Transform, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """The first ``count`` samples in unshuffled order, without dropout (validation, evaluation)."""
    out = []
    for position, handle in enumerate(source.epoch_handles(0, seed, False)):
        if position >= count:
            break
        out.append(transform(source.load(handle, sample_rng(seed, 0, position)), None))
    return out
