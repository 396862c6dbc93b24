"""FSDP for HF transformers: one FSDP unit per transformer block, named in YAML.

Lightning's `FSDPStrategy` takes the wrap policy as a set of module classes, which a YAML preset
cannot hold. This subclass takes dotted class paths instead, defaulting to the blocks of the two
families we pretrain, so `configs/trainer/fsdp.yaml` shards GPT-2 and T5 per block out of the box
and a user adds another architecture's block by name. GPU only: Lightning refuses FSDP on CPU.
"""

from __future__ import annotations

import importlib
from typing import Literal

from lightning.pytorch.strategies import FSDPStrategy

DEFAULT_BLOCKS = (
    "transformers.models.gpt2.modeling_gpt2.GPT2Block",
    "transformers.models.t5.modeling_t5.T5Block",
)


def resolve_class(dotted: str) -> type:
    """``"package.module.Class"`` -> the class, with an error naming the path."""
    module_name, _, class_name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"trainer.strategy.init_args.block_classes: cannot import {dotted!r} ({e})") from None


class TransformerBlockFSDPStrategy(FSDPStrategy):
    """FSDP wrapping each transformer block (and optionally checkpointing its activations).

    Args:
        block_classes: Dotted paths of the block classes to wrap (and to checkpoint).
        activation_checkpointing: Recompute each block's activations in backward.
        sharding_strategy: FULL_SHARD (ZeRO-3-like), SHARD_GRAD_OP (ZeRO-2-like), HYBRID_SHARD
            (full shard within a node, replicate across nodes) or NO_SHARD (DDP).
        state_dict_type: "full" writes one ordinary checkpoint file (rank 0 gathers the weights);
            "sharded" writes a directory of per-rank shards (faster for very large models).
        cpu_offload: Keep parameters and gradients in CPU RAM between uses.
    """

    def __init__(
        self,
        block_classes: list[str] = list(DEFAULT_BLOCKS),
        activation_checkpointing: bool = False,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD",
        state_dict_type: Literal["full", "sharded"] = "full",
        cpu_offload: bool = False,
    ) -> None:
        blocks = {resolve_class(name) for name in block_classes}
        super().__init__(
            auto_wrap_policy=blocks,
            activation_checkpointing_policy=blocks if activation_checkpointing else None,
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            cpu_offload=cpu_offload,
        )

    def setup_environment(self) -> None:
        from lightning.pytorch.accelerators import CPUAccelerator

        if isinstance(self.accelerator, CPUAccelerator):
            # torch's FSDP1 raises deep inside wrapping ("needs a non-CPU accelerator device").
            raise ValueError("trainer.strategy: FSDP needs GPUs (torch's FSDP cannot run on CPU processes). "
                             "On CPU use configs/trainer/deepspeed-zero3-cpu.yaml (the same full sharding) "
                             "or ddp-cpu.yaml.")
        super().setup_environment()
