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

    The position inside the epoch is restored by the sampler (see
    :meth:`PretrainDataModule.train_dataloader`); the state only records what the block sequence
    depends on, and loading it refuses a checkpoint whose sequence would differ.
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


class ResumableShuffleSampler(DistributedSampler):
    """Each epoch a seeded permutation of the dataset, split across ranks, that can resume mid-epoch.

    Epoch ``e`` uses ``torch.randperm(n, generator=seed + e)``; rank ``r`` takes positions
    ``r, r + world, ...`` of it, cut to whole batches so every rank runs the same number of steps.
    Subclasses DistributedSampler so Lightning keeps it under DDP instead of wrapping it.
    """

    def __init__(self, dataset: Any, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.batches_per_epoch = len(dataset) // (num_replicas * batch_size)
        if self.batches_per_epoch < 1:
            raise ValueError(f"{len(dataset)} training examples are fewer than one batch on every rank "
                             f"({batch_size} x {num_replicas}); lower data.batch_size or use more data")
        self._resume: tuple[int, int] | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size  # the full epoch, also when resuming

    def resume(self, epoch: int, batches_done: int) -> None:
        """Make the next iteration of ``epoch`` skip its first ``batches_done`` batches."""
        self.set_epoch(epoch)
        self._resume = (int(epoch), min(int(batches_done), self.batches_per_epoch))

    def __iter__(self) -> Iterator[int]:
        start = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        self._resume = None
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        mine = order[self.rank :: self.num_replicas][: self.batches_per_epoch * self.batch_size].tolist()
        return iter(mine[start * self.batch_size :])


def batches_done_on_resume(trainer: Any) -> tuple[int, int]:
    """(epoch, batches already done in it) for a sampler's ``resume`` when Lightning restored a
    checkpoint, else (epoch, 0). `processed`, not `completed`: a checkpoint saved in
    on_train_batch_end holds completed = processed - 1, yet that batch is done."""
    epoch_loop = trainer.fit_loop.epoch_loop
    done = epoch_loop.batch_progress.current.processed if epoch_loop.restarting else 0
    return trainer.current_epoch, done
