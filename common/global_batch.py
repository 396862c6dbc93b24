"""The effective global batch, computed once and logged at the start of every fit.

Hyper-parameters like the learning rate are tuned for a global batch, not a per-GPU one; a run
moved from 8 to 16 GPUs, or given accumulation, silently changes it. So every run states it:
micro-batch x accumulation x world size, in sequences and (for fixed-length blocks) the corpus
tokens they consume (for T5 span corruption the raw window, longer than the encoder input).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info


@dataclass(frozen=True)
class GlobalBatch:
    """One optimizer step's worth of data across all ranks."""

    micro_batch: int  # sequences per rank per forward/backward
    accumulation: int  # micro-batches per optimizer step
    world_size: int  # data-parallel ranks (devices x nodes)
    sequence_length: int | None  # corpus tokens per sequence, when fixed (packed blocks)

    @property
    def sequences(self) -> int:
        return self.micro_batch * self.accumulation * self.world_size

    @property
    def tokens(self) -> int | None:
        return None if self.sequence_length is None else self.sequences * self.sequence_length

    def describe(self) -> str:
        text = (f"global batch = {self.micro_batch} (micro-batch) x {self.accumulation} (accumulation) "
                f"x {self.world_size} (world size) = {self.sequences} sequences")
        if self.tokens is not None:
            text += f" = {self.tokens:,} corpus tokens ({self.sequence_length} per sequence)"
        return text


class GlobalBatchLogger(pl.Callback):
    """Prints the global batch and logs it with the hyper-parameters (``global_batch/*``).

    The micro-batch and sequence length come from the data module (``batch_size``, and
    ``sequence_tokens`` where sequences have a fixed length).
    """

    def __init__(self) -> None:
        self.global_batch: GlobalBatch | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = trainer.datamodule
        micro_batch = getattr(datamodule, "batch_size", None)
        if micro_batch is None:
            return
        self.global_batch = GlobalBatch(int(micro_batch), trainer.accumulate_grad_batches, trainer.world_size,
                                        getattr(datamodule, "sequence_tokens", None))
        rank_zero_info(self.global_batch.describe())
        params = {f"global_batch/{k}": v for k, v in asdict(self.global_batch).items()}
        params.update({"global_batch/sequences": self.global_batch.sequences,
                       "global_batch/tokens": self.global_batch.tokens})
        for logger in trainer.loggers:
            logger.log_hyperparams(params)
