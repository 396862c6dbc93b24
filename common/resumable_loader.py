"""Data loading that resumes mid-epoch exactly, for both stages.

Lightning restores the loop counters from a checkpoint but restarts a plain DataLoader at the
beginning of its epoch, so a resumed run would see some batches twice and others never. Here the
sampler itself knows how far into the epoch the checkpoint was (`resume(epoch, batches_done)`),
and the loader carries the settings the order depends on, refusing a checkpoint made with others.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler


class ResumableDataLoader(DataLoader):
    """A DataLoader with ``state_dict`` / ``load_state_dict``, so Lightning treats it as resumable.

    The position inside the epoch is restored by the sampler (:class:`ResumableSampler`); the state
    only records what the sample order depends on, and loading it refuses a checkpoint whose order
    would differ.
    """

    def __init__(self, *args: Any, loader_state: dict[str, Any], state_defaults: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        """A DataLoader that also carries ``loader_state``.

        Args:
            args: positional DataLoader arguments.
            loader_state: the settings the data order depends on (checked on resume).
            state_defaults: values assumed for keys that older checkpoints do not have.
            kwargs: keyword DataLoader arguments.
        """
        super().__init__(*args, **kwargs)
        self.loader_state = dict(loader_state)
        self.state_defaults = dict(state_defaults or {})

    def state_dict(self) -> dict[str, Any]:
        """The settings the data order depends on (seed, batch size, world size, ...)."""
        return dict(self.loader_state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check a checkpoint's settings match ours; resuming with others would not be exact."""
        state_dict = {**self.state_defaults, **state_dict}
        diff = {k: (v, self.loader_state.get(k)) for k, v in state_dict.items() if self.loader_state.get(k) != v}
        if diff:
            raise ValueError("cannot resume the train dataloader exactly: settings differ from the checkpoint "
                             + ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items()))


class ResumableSampler(DistributedSampler):
    """Whole batches of per-rank sample indices, in an order fixed by the epoch, resumable mid-epoch.

    Every rank gets ``batches_per_epoch`` batches of ``batch_size`` indices per epoch;
    ``resume(epoch, batches_done)`` makes the next iteration of that epoch skip the batches already
    trained on. ``len`` is always the full epoch: Lightning counts the restored batches against it.
    Subclasses say what an epoch's order is (:meth:`epoch_indices`, a pure function of the
    settings and ``self.epoch``, so a restarted process recomputes the same one). Subclasses
    DistributedSampler so Lightning keeps it under DDP instead of wrapping it.
    """

    def __init__(self, dataset: Any, batch_size: int, batches_per_epoch: int, num_replicas: int = 1,
                 rank: int = 0, seed: int = 0, shuffle: bool = False) -> None:
        """Args: the dataset; per-rank batch size; batches per epoch on every rank; world size; this
        rank; seed and shuffle, kept as DistributedSampler attributes (the order itself comes from epoch_indices)."""
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self._resume: tuple[int, int] | None = None

    def epoch_indices(self) -> list[int]:
        """This rank's ``batches_per_epoch * batch_size`` sample indices for epoch ``self.epoch``, in order."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def resume(self, epoch: int, batches_done: int) -> None:
        """Make the next iteration of ``epoch`` skip its first ``batches_done`` batches."""
        if not 0 <= batches_done <= self.batches_per_epoch:
            raise ValueError(f"resume: batches_done={batches_done} outside [0, {self.batches_per_epoch}]")
        # Set the epoch now: Lightning creates the iterator (and prefetches) before calling set_epoch.
        self.set_epoch(epoch)
        self._resume = (int(epoch), int(batches_done))

    def resume_from(self, trainer: Any) -> None:
        """Resume where the checkpoint Lightning restored left off (batch 0 on a fresh fit).

        Capped at the epoch: a checkpoint from other settings (batch size, world size) may have done
        more batches; the loader's ``load_state_dict`` then refuses it naming the setting, which says
        more than an out-of-range count would.
        """
        epoch, done = batches_done_on_resume(trainer)
        self.resume(epoch, min(done, self.batches_per_epoch))

    def __iter__(self) -> Iterator[int]:
        # Decide the start eagerly (not inside a generator) so the resume point is consumed exactly once.
        start = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        self._resume = None
        return iter(self.epoch_indices()[start * self.batch_size :])


class ResumableShuffleSampler(ResumableSampler):
    """Each epoch a seeded permutation of the dataset, split across ranks, that can resume mid-epoch.

    Epoch ``e`` uses ``torch.randperm(n, generator=seed + e)``; rank ``r`` takes positions
    ``r, r + world, ...`` of it, cut to whole batches so every rank runs the same number of steps.
    """

    def __init__(self, dataset: Any, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        batches_per_epoch = len(dataset) // (num_replicas * batch_size)
        if batches_per_epoch < 1:
            raise ValueError(f"{len(dataset)} training examples are fewer than one batch on every rank "
                             f"({batch_size} x {num_replicas}); lower data.batch_size or use more data")
        super().__init__(dataset, batch_size, batches_per_epoch, num_replicas, rank, seed, shuffle=True)

    def epoch_indices(self) -> list[int]:
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return order[self.rank :: self.num_replicas][: self.batches_per_epoch * self.batch_size].tolist()


class ResumableBatchListSampler(ResumableSampler):
    """A sampler whose every item is one whole batch (a list), recomputed per epoch by
    :meth:`_batches` (a pure function of the settings and the epoch); use it as the ``sampler`` of a
    DataLoader with ``batch_size=None`` over a dataset that takes such lists (:class:`BatchView`).

    How many batches an epoch makes depends on the draw, so every epoch has the same number per
    rank, fixed from epoch 0 with a 2% margin (extra batches are left out, like drop_last; a short
    epoch, which the margin makes unlikely, repeats its first batches): Lightning's epoch length and
    mid-epoch resume (inherited: skip the batches done) stay exact. Batches are dealt round-robin
    to the ranks.
    """

    too_few = "fewer than one batch on every rank"  # how a subclass names its too-small data

    def __init__(self, n_items: int, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        self.seed, self.num_replicas = seed, num_replicas
        per_rank = int(0.98 * len(self._batches(0))) // num_replicas
        if per_rank < 1:
            raise ValueError(f"{n_items} training examples make {self.too_few}")
        super().__init__(list(range(n_items)), 1, per_rank, num_replicas, rank, seed, shuffle=True)

    def _batches(self, epoch: int) -> list[list[Any]]:
        raise NotImplementedError

    def epoch_indices(self) -> list[list[Any]]:  # type: ignore[override]  # batches, not indices
        mine = self._batches(self.epoch)[self.rank::self.num_replicas]
        while len(mine) < self.batches_per_epoch:
            mine += mine[: self.batches_per_epoch - len(mine)]
        return mine[: self.batches_per_epoch]


class ResumableTokenBatchSampler(ResumableBatchListSampler):
    """Token-based batches (fairseq/JoeyNMT ``batch_type: token``): similar-length examples grouped
    so that each batch holds at most ``max_tokens`` tokens, padding included (its size times its
    longest example). Short sentences make big batches, long ones small, and padding is small.

    Each item is a list of dataset indices. Epoch ``e``: a seeded permutation (seed + e), cut into
    pools of ``pool`` examples, each sorted by length and cut greedily into batches; the batches
    are shuffled (same generator).
    """

    def __init__(self, lengths: list[int], max_tokens: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 pool: int = 4096) -> None:
        if max_tokens < 1:
            raise ValueError(f"data.batch_tokens must be >= 1, got {max_tokens}")
        self.lengths, self.max_tokens, self.pool = list(lengths), max_tokens, pool
        self.too_few = f"fewer than one token batch of {max_tokens} tokens on every rank; lower data.batch_tokens or use more data"
        super().__init__(len(self.lengths), num_replicas, rank, seed)

    def _batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        batches: list[list[int]] = []
        for start in range(0, len(order), self.pool):
            batch: list[int] = []
            for i in sorted(order[start:start + self.pool], key=self.lengths.__getitem__):
                if batch and self.lengths[i] * (len(batch) + 1) > self.max_tokens:  # sorted: i is the longest
                    batches.append(batch)
                    batch = []
                batch.append(i)
            batches.append(batch)
        return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]


class ResumablePackedSampler(ResumableBatchListSampler):
    """Packed batches (``--data.packing``): each item is a batch of ``rows_per_batch`` rows, each row
    a list of dataset indices whose lengths sum to at most ``row_tokens`` (the context).

    Epoch ``e``: a seeded permutation (seed + e) filled in order into rows, a row closed when the
    next example does not fit (next-fit: the rows mix lengths at random, as the unpacked order
    does; with examples much shorter than the context little room is lost); consecutive rows make
    the batches, an incomplete last batch is left out.
    """

    def __init__(self, lengths: list[int], row_tokens: int, rows_per_batch: int, num_replicas: int = 1,
                 rank: int = 0, seed: int = 0) -> None:
        self.lengths, self.row_tokens, self.rows_per_batch = list(lengths), row_tokens, rows_per_batch
        longest = max(self.lengths, default=0)
        if longest > row_tokens:
            raise ValueError(f"data.packing: an example of {longest} tokens does not fit a row of {row_tokens}")
        self.too_few = (f"fewer than one batch of {rows_per_batch} packed rows of {row_tokens} tokens on every rank; "
                        "lower data.batch_size (rows per batch) or use more data")
        super().__init__(len(self.lengths), num_replicas, rank, seed)

    def _batches(self, epoch: int) -> list[list[list[int]]]:
        order = torch.randperm(len(self.lengths), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        rows: list[list[int]] = [[]]
        used = 0
        for i in order:
            if rows[-1] and used + self.lengths[i] > self.row_tokens:
                rows.append([])
                used = 0
            rows[-1].append(i)
            used += self.lengths[i]
        n = self.rows_per_batch
        return [rows[j:j + n] for j in range(0, len(rows) - n + 1, n)]


class BatchView(torch.utils.data.Dataset):
    """``dataset[[i, j, ...]] -> [dataset[i], dataset[j], ...]``: the rows of one sampled batch
    (``dataset[[[i, j], [k]]] -> [[dataset[i], dataset[j]], [dataset[k]]]`` for packed rows)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, batch: list[Any]) -> list[Any]:
        # Nested lists (packed batches: rows of indices) keep their shape.
        return [self[i] if isinstance(i, list) else self.dataset[i] for i in batch]


def batches_done_on_resume(trainer: Any) -> tuple[int, int]:
    """(epoch, batches already done in it) when Lightning restored a checkpoint, else (epoch, 0).

    Lightning restores the loop progress before it asks for the train dataloader (fit_loop.setup_data
    runs while the loops are still ``restarting``). `processed`, not `completed`: a checkpoint saved
    in on_train_batch_end holds completed = processed - 1 (completed is bumped after the hook), yet
    that batch is done. When not restarting (a fresh fit, or a reload at a later epoch) the counter
    is stale or zero, so the epoch starts at batch 0.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    done = epoch_loop.batch_progress.current.processed if epoch_loop.restarting else 0
    return trainer.current_epoch, done
