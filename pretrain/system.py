"""The Lightning systems for pretraining; the models themselves are `transformers`' GPT-2 and T5.

`PretrainSystem` adds to `common.system.LMSystem` (optimiser, schedule, clipping, checkpoint
metadata, RNG state, W&B continuity) what pretraining needs: a model built from a typed
architecture once the corpus tokenizer is known, token-weighted validation loss and perplexity,
and the trained context recorded in the model config. A family subclass adds only its model, its
loss and its FLOPs: `CausalLMSystem` (GPT-2, next-token loss on packed blocks) and
`SpanCorruptionSystem` (T5, span-corruption loss over target tokens).

Model and data meet once: the CLI tells the data module the system's ``objective`` (a class
attribute, so a T5 system always gets span-corruption batches), and `configure_model` takes the
tokenizer and the context length from the data module (`PretrainDataModule.model_inputs`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, SumMetric

from common.archs import GPT2Arch, T5Arch, build_gpt2, build_t5
from common.bits_per_byte import LN2, ScoredBytes
from common.model_context import TRAINED_CONTEXT_KEY, record_trained_context
from common.system import LMSystem
from common.throughput import decoder_flops_per_token, decoder_n_params, seq2seq_flops_per_example, seq2seq_shape


class PretrainSystem(LMSystem):
    """What GPT and T5 pretraining share; subclasses set ``family``/``objective`` and implement
    ``build_model``, ``compute_loss`` and ``flops_per_batch``.

    Args:
        arch: Model shape (presets in configs/pretrain/ override a few fields).
        lr: Peak learning rate, reached after ``warmup_steps``.
        min_lr_ratio: Final LR as a fraction of ``lr`` at ``trainer.max_steps`` (cosine decay).
        warmup_steps: Linear warmup steps (optimizer steps, not micro-batches).
        weight_decay: AdamW decay on matmul weights; biases, norms and embeddings get none.
        betas: AdamW betas (0.9, 0.95 as in GPT-3).
        fused_adamw: Use the fused AdamW kernel (None = where torch supports it).
        compile: `torch.compile` the model (costs ~1 min up front, ~15% faster steps).
        activation_checkpointing: Recompute each block's activations in backward instead of
            storing them (HF gradient checkpointing): ~1/3 more compute for far less activation
            memory; the switch for long blocks or large micro-batches.
    """

    stage = "pretrain"
    family: str = ""  # the HF model_type this system trains (checkpoint metadata)
    objective: str = ""  # the batches it consumes: PretrainDataModule's objective
    arch_class: type = GPT2Arch

    def __init__(
        self,
        arch: Any = None,
        lr: float = 6e-4,
        min_lr_ratio: float = 0.1,
        warmup_steps: int = 100,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        fused_adamw: bool | None = None,
        compile: bool = False,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if arch is None:
            arch = self.arch_class()
        elif isinstance(arch, dict):  # from a checkpoint's hyper_parameters
            arch = self.arch_class(**arch)
        self.arch = arch
        # Primitives only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters({"arch": arch.to_dict(), "lr": lr, "min_lr_ratio": min_lr_ratio,
                                   "warmup_steps": warmup_steps, "weight_decay": weight_decay,
                                   "betas": list(betas), "fused_adamw": fused_adamw, "compile": compile,
                                   "activation_checkpointing": activation_checkpointing})
        self.val_loss = MeanMetric()
        # val/bpb: total NLL and bytes of the scored text, summed across batches and ranks (float64:
        # ~1e5-1e8 nats per validation), the bytes of each batch decoded once (common/bits_per_byte.py).
        self.val_nats = SumMetric().set_dtype(torch.float64)
        self.val_bytes = SumMetric().set_dtype(torch.float64)
        self._scored_bytes = ScoredBytes()
        self._n_params: Any = None  # parameter count(s) for the FLOPs formula, once the model exists

    # ---- model construction -------------------------------------------------------------
    def configure_model(self) -> None:
        """Build the HF model once the data module has prepared its tokenizer (vocab size)."""
        if self.model is not None:
            return
        inputs = self.trainer.datamodule.model_inputs()
        if inputs.objective != self.objective:
            raise ValueError(f"{type(self).__name__} ({self.family}) trains on data.objective={self.objective!r}, "
                             f"but the data module is configured with {inputs.objective!r}")
        self.build(inputs.tokenizer, inputs.context_length)

    def build(self, tokenizer: Any, context_length: int) -> None:
        """The model for ``tokenizer`` trained at ``context_length`` tokens (GPT: the block; T5: the
        encoder input), which becomes its recorded usable context (common/model_context.py)."""
        self.tokenizer = tokenizer
        if self._trainer is not None and getattr(self.trainer.strategy, "zero_stage_3", False):
            # Built inside DeepSpeed's zero.Init (ZeRO-3): each weight is partitioned into an empty
            # placeholder as its module is created, so HF's init (std 0.02, scaled residuals) would
            # run on nothing and still mark the modules initialised (measured: val loss 19 instead
            # of 4.9 after 4 steps). Skip it, then init on gathered weights, as HF's from_config does.
            from transformers.initialization import no_init_weights
            from transformers.integrations.deepspeed import initialize_weights_zero3

            with no_init_weights():
                self.model = self.build_model(tokenizer, context_length)
            initialize_weights_zero3(self.model)
            self.model.tie_weights()
        else:
            self.model = self.build_model(tokenizer, context_length)
        record_trained_context(self.model.config, context_length)
        if self.hparams.activation_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.hparams.compile:
            self.model.compile()  # in place: state_dict keys stay free of `_orig_mod.`

    def build_model(self, tokenizer: Any, context_length: int) -> torch.nn.Module:
        raise NotImplementedError

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(mean loss over the batch's target tokens, number of target tokens)."""
        raise NotImplementedError

    def scored_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The target ids whose loss ``compute_loss`` averages (their text is what val/bpb divides by)."""
        raise NotImplementedError

    def model_family(self) -> str | None:
        return self.family

    # ---- steps ----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self.compute_loss(batch)
        self.log_train_loss(loss)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, n_tokens = self.compute_loss(batch)
        self.val_loss.update(loss, weight=n_tokens)  # token-weighted, synced across ranks
        self.val_nats.update(loss.detach().double() * n_tokens)
        self.val_bytes.update(float(self._scored_bytes(self.tokenizer, batch_idx, self.scored_tokens(batch))))

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        nats, n_bytes = self.val_nats.compute(), self.val_bytes.compute()
        for metric in (self.val_loss, self.val_nats, self.val_bytes):
            metric.reset()
        # Already reduced across ranks by the metric; sync_dist only tells Lightning so (a no-op mean).
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", loss.exp(), sync_dist=True)  # exp of the mean loss, not the mean of exps
        if n_bytes > 0:  # tokenizer-independent: compares runs whose tokenizers differ (common/bits_per_byte.py)
            self.log("val/bpb", (nats / LN2 / n_bytes).float(), sync_dist=True)

    # ---- checkpoints ----------------------------------------------------------------------
    def checkpoint_loaded(self, meta: dict) -> None:
        if self.model is not None and meta["hf_config"].get(TRAINED_CONTEXT_KEY):
            # A run continued at another block size has been trained at the longer of the two.
            record_trained_context(self.model.config, meta["hf_config"][TRAINED_CONTEXT_KEY])


class CausalLMSystem(PretrainSystem):
    """GPT-2-style decoder pretraining: next-token loss on packed blocks (``data.objective: causal_lm``)."""

    family = "gpt2"
    objective = "causal_lm"
    arch_class = GPT2Arch

    def __init__(self, arch: GPT2Arch | None = None, **optim: Any) -> None:
        """GPT-2 pretraining.

        Args:
            arch: GPT-2 shape (None: the defaults, GPT-2 small, 124M).
            optim: optimisation settings, see PretrainSystem.
        """
        super().__init__(arch, **optim)

    def build_model(self, tokenizer: Any, context_length: int) -> torch.nn.Module:
        if context_length > self.arch.n_positions:
            raise ValueError(f"data.block_size={context_length} exceeds model.arch.n_positions={self.arch.n_positions}")
        return build_gpt2(self.arch, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, 6N + 12·L·d·T (used by SpeedMonitor for MFU)."""
        if self._n_params is None:  # counted once: walking the parameters every step costs ~ms
            self._n_params = decoder_n_params(self.model)
        return decoder_flops_per_token(self._n_params, self.arch.n_layer, self.arch.n_embd, seq_len)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        logits = self.model(input_ids=batch["input_ids"]).logits  # (B, T, V)
        targets = batch["targets"]  # (B, T): input_ids shifted left by one
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten()), targets.numel()

    def scored_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["targets"]


class SpanCorruptionSystem(PretrainSystem):
    """T5-style encoder-decoder pretraining with span corruption (``data.objective: span_corruption``).

    The encoder reads the corrupted block (sentinels in place of the noise spans), the decoder
    predicts the dropped spans; loss and perplexity are over those target tokens.
    """

    family = "t5"
    objective = "span_corruption"
    arch_class = T5Arch

    def __init__(self, arch: T5Arch | None = None, **optim: Any) -> None:
        """T5 span-corruption pretraining.

        Args:
            arch: T5 shape (None: the defaults, T5 v1.1-small-like, ~60M with a 32k vocabulary).
            optim: optimisation settings, see PretrainSystem.
        """
        super().__init__(arch, **optim)

    def build_model(self, tokenizer: Any, context_length: int) -> torch.nn.Module:
        return build_t5(self.arch, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)

    def flops_per_batch(self, batch: dict[str, torch.Tensor]) -> float:
        """Training FLOPs of one micro-batch (encoder over inputs, decoder over targets)."""
        (batch_size, in_len), out_len = batch["input_ids"].shape, batch["labels"].shape[-1]
        if self._n_params is None:  # counted once: walking the parameters every step costs ~2 ms
            self._n_params = seq2seq_shape(self.model)
        return batch_size * seq2seq_flops_per_example(self._n_params, in_len, out_len)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        # No padding anywhere (lengths are computed so blocks fit exactly): HF's mean over labels
        # is the mean over target tokens. decoder_input_ids = labels shifted right after pad.
        labels = batch["labels"]  # (B, T_out)
        return self.model(input_ids=batch["input_ids"], labels=labels).loss, labels.numel()

    def scored_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["labels"]  # sentinels + the dropped spans + EOS: the spans' text is the scored text
