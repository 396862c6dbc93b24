"""The Lightning system for fine-tuning and evaluating any HF causal LM or seq2seq model on a task.

Training minimises the token loss of the completion (decoder-only: the prompt is masked, see
`finetune.data`). Validation and test *generate* (greedy or beam search, KV cache, stop at EOS or
the template's stop strings) and score the task metric; ``val/score`` (BLEU, ROUGE-L or SQuAD F1)
selects the best checkpoint. Predictions from all ranks are gathered by item index, so the
results are in a fixed order whatever the number of devices (duplicates that the distributed
sampler pads with are dropped). Under DeepSpeed ZeRO-3 every rank generates in lockstep.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule

from common.checkpoint_io import CHECKPOINT_FORMAT, CHECKPOINT_KEY, CheckpointError, check_lmtrain_checkpoint
from common.deepspeed_strategy import generation_needs_sync, offloads_optimizer
from common.gradient_clipping import GradientClipping
from common.model_context import record_trained_context
from common.optim import build_adamw, build_warmup_cosine
from common.tokenizer import tokenizer_to_files
from finetune.metrics import compute_metrics
from finetune.pretrained import build_scratch_model, load_pretrained, scratch_kind, scratch_tokenizer
from finetune.prompts import strip_completion
from finetune.significance import confidence_intervals

PRIMARY_METRIC = {"bleu_chrf": "bleu", "rouge": "rougeL", "squad": "f1"}


class FinetuneSystem(GradientClipping, LightningModule):
    """Fine-tune / evaluate a pretrained model (``init``) on the data module's task.

    Args:
        init: Our pretraining checkpoint (.ckpt, ZeRO dir, run dir), a Hugging Face model
            directory, or a hub name (gpt2, t5-small, facebook/bart-base, Helsinki-NLP/opus-mt-en-fr).
        scratch: Instead of ``init``: the HF config of a model trained from scratch, e.g.
            ``{model_type: rnn_seq2seq, cell: gru, attention: bahdanau}`` or ``{model_type: t5, d_model: 256}``.
        tokenizer: With ``scratch``: an existing tokenizer (path or hub name); None trains a
            byte-level BPE on the task's train split (saved in <run dir>/tokenizer, reused on resume).
        tokenizer_vocab_size: Vocabulary of that trained BPE.
        lr: Peak learning rate.
        min_lr_ratio: Final LR as a fraction of ``lr`` (cosine decay over trainer.max_steps).
        warmup_steps: Linear warmup steps.
        weight_decay: AdamW decay on matmul weights.
        num_beams: Beam width for generation (1 = greedy).
        length_penalty: Beam-search length penalty (> 1 favours longer outputs).
        max_new_tokens: Tokens generated per prompt.
    """

    def __init__(
        self,
        init: str | None = None,
        scratch: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        tokenizer_vocab_size: int = 8000,
        lr: float = 1e-4,
        min_lr_ratio: float = 0.1,
        warmup_steps: int = 0,
        weight_decay: float = 0.0,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        max_new_tokens: int = 64,
    ) -> None:
        super().__init__()
        if num_beams < 1:
            raise ValueError(f"model.num_beams must be >= 1, got {num_beams}")
        if (init is None) == (scratch is None):
            raise ValueError("give exactly one of model.init (a pretrained model) and model.scratch (a config "
                             "to train from scratch)")
        self.save_hyperparameters()
        self.model: Any = None
        self.tokenizer: Any = None
        if init is not None:
            loaded = load_pretrained(init)
            self.model, self.tokenizer, self.kind = loaded.model, loaded.tokenizer, loaded.kind
        else:
            self.kind = scratch_kind(scratch)  # also validates the config before any work
        self._predictions: list[tuple[int, str]] = []
        self.last_results: dict[str, Any] = {}
        self._rng_to_restore: dict | None = None

    def build_from_scratch(self, task: Any, train_split: str) -> None:
        """Tokenizer and freshly initialised model for ``model.scratch`` (the data module calls this
        in its set-up, because a trained tokenizer needs the task's data)."""
        if self.model is not None:
            return
        self.tokenizer = scratch_tokenizer(self.hparams.tokenizer, task, train_split,
                                           self.hparams.tokenizer_vocab_size, self.trainer)
        self.model = build_scratch_model(self.hparams.scratch, self.tokenizer)

    # ---- training -----------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        # Fine-tuning past the usable context (an explicit data.max_length) trains those positions:
        # the checkpoint and its export then declare the longer context.
        datamodule = self.trainer.datamodule
        if datamodule.max_length > datamodule.context["usable_context"]:
            record_trained_context(self.model.config, datamodule.max_length)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss  # mean over completion/label tokens (-100 elsewhere)
        self.log("train/loss", loss, prog_bar=True)
        if self._is_logging_step():
            self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        return loss

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        max_steps = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 \
            else int(self.trainer.estimated_stepping_batches)
        optimizer = build_adamw(self.model, lr=hp.lr, weight_decay=hp.weight_decay,
                                cpu_offload=offloads_optimizer(self.trainer.strategy))
        warmup = min(hp.warmup_steps, max(max_steps - 1, 0))
        scheduler = build_warmup_cosine(optimizer, warmup, max_steps, hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- generation + scoring -----------------------------------------------------------------
    @torch.no_grad()
    def generate_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
        """Completions for a batch of prompts (left-padded for decoder-only), stop strings applied."""
        template = self.trainer.datamodule.template
        tok = self.tokenizer
        synced = generation_needs_sync(self.trainer)
        # Stop strings matter for decoder-only models continuing a prompt; seq2seq targets end at EOS
        # (the stop strings are still cut from the text below).
        stop = template.stop if self.kind == "decoder" else []
        out = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=False, num_beams=self.hparams.num_beams,
            length_penalty=self.hparams.length_penalty, max_new_tokens=self.hparams.max_new_tokens,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            **({"stop_strings": stop, "tokenizer": tok} if stop else {}),
            synced_gpus=synced,  # ZeRO-3: weights are gathered collectively on every step
        )  # (B, T_prompt + new) for decoder-only, (B, 1 + new) for encoder-decoder
        new = out[:, input_ids.shape[1]:] if self.kind == "decoder" else out
        return [strip_completion(text, template.stop) for text in tok.batch_decode(new, skip_special_tokens=True)]

    def _eval_step(self, batch: dict[str, torch.Tensor]) -> None:
        texts = self.generate_texts(batch["input_ids"], batch["attention_mask"])
        self._predictions.extend(zip(batch["index"].tolist(), texts))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def _gathered_predictions(self) -> list[str]:
        local, self._predictions = self._predictions, []
        if dist.is_available() and dist.is_initialized() and self.trainer.world_size > 1:
            parts: list[Any] = [None] * self.trainer.world_size
            dist.all_gather_object(parts, local)
            local = [p for part in parts for p in part]
        by_index = dict(local)  # the distributed sampler's padding repeats items: keep one
        return [by_index[i] for i in sorted(by_index)]

    def score(self, stage: str) -> dict[str, Any]:
        """Gather predictions, score them against the items' references; returns the results."""
        datamodule = self.trainer.datamodule
        items = datamodule.eval_items[stage]
        predictions = self._gathered_predictions()
        if len(predictions) != len(items):
            raise RuntimeError(f"{stage}: {len(predictions)} predictions for {len(items)} items")
        task = datamodule.task
        references, lang = [it["references"] for it in items], task.target_lang or "en"
        metrics = compute_metrics(task.metric, predictions, references, lang=lang)
        intervals = confidence_intervals(task.metric, predictions, references, lang=lang)
        primary = PRIMARY_METRIC[task.metric]
        self.last_results = {"task": task.name, "split": datamodule.splits[stage], "model": self.hparams.init,
                             "kind": self.kind, "metric": task.metric, "score": metrics[primary],
                             "score_name": primary, "metrics": metrics, "ci95": intervals["intervals"],
                             "ci_method": intervals["method"], **datamodule.prompt_stats(stage),
                             "num_beams": self.hparams.num_beams, "max_new_tokens": self.hparams.max_new_tokens,
                             "predictions": predictions}
        return self.last_results

    def _log_scores(self, prefix: str, results: dict[str, Any]) -> None:
        self.log(f"{prefix}/score", float(results["score"]), prog_bar=True, sync_dist=True)
        for name, value in results["metrics"].items():
            if isinstance(value, (int, float)) and not name.startswith("n_"):
                self.log(f"{prefix}/{name}", float(value), sync_dist=True)
        if prefix == "test":  # evaluate's W&B summary carries the uncertainty and the n of N
            for name, (low, high) in results["ci95"].items():
                self.log(f"test/{name}_ci95_low", float(low), sync_dist=True)
                self.log(f"test/{name}_ci95_high", float(high), sync_dist=True)
            self.log("test/n_items", float(results["n_prompts"]), sync_dist=True)
            self.log("test/n_total", float(results["n_total"]), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self._predictions = []
            return
        self._log_scores("val", self.score("val"))

    def on_test_epoch_end(self) -> None:
        self._log_scores("test", self.score("test"))

    # ---- checkpoints --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {"format": CHECKPOINT_FORMAT, "family": self.kind,
                                      "hf_config": self.model.config.to_dict(),
                                      "tokenizer_files": tokenizer_to_files(self.tokenizer),
                                      "tokenizer_fingerprint": None}
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(), "python": random.getstate()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = check_lmtrain_checkpoint(checkpoint, "checkpoint", require_weights=False)
        if meta["family"] != self.kind:
            raise CheckpointError(f"the checkpoint holds a {meta['family']} model; model.init gives a {self.kind}")
        self._rng_to_restore = checkpoint.get("rng_states")

    def on_train_start(self) -> None:
        if self._rng_to_restore:
            torch.set_rng_state(self._rng_to_restore["torch"])
            random.setstate(self._rng_to_restore["python"])
            self._rng_to_restore = None
