"""The Lightning system for fine-tuning and evaluating any HF causal LM or seq2seq model on a task.

Training minimises the token loss of the completion (decoder-only: the prompt is masked, see
`finetune.data`). Validation and test *generate* (greedy or beam search, KV cache, stop at EOS or
the template's stop strings) and score the task metric; ``val/score`` (BLEU, ROUGE-L or SQuAD F1)
selects the best checkpoint. Predictions from all ranks are gathered by item index, so the
results are in a fixed order whatever the number of devices (duplicates that the distributed
sampler pads with are dropped). Under DeepSpeed ZeRO-3 every rank generates in lockstep.

The system never looks at the data module: an evaluation batch carries its items' references and
how to score them (`finetune.data.Scoring`: metric, language, stop strings, the split's size). The other direction
is one call, `FinetuneDataModule.connect(tokenizer, kind, config)`, made by the CLI.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common.archs import GPT2Arch
from common.checkpoints import ADAPTER_KEY, CheckpointError
from common.deepspeed_strategy import generation_needs_sync
from common.model_context import record_trained_context
from common.system import LMSystem
from finetune.adapters import (PeftOptions, add_adapter, adapter_metadata, adapter_options,
                               base_fingerprint, check_base, drop_base_weights, is_adapted, peft_options)
from finetune.metrics import compute_metrics
from finetune.pretrained import ScratchArch, build_scratch_model, load_pretrained, scratch_arch, scratch_tokenizer
from finetune.prompts import strip_completion
from finetune.significance import confidence_intervals

PRIMARY_METRIC = {"bleu_chrf": "bleu", "rouge": "rougeL", "squad": "f1"}


class FinetuneSystem(LMSystem):
    """Fine-tune / evaluate a pretrained model (``init``) or one trained from scratch on a task.

    Args:
        init: Our pretraining checkpoint (.ckpt, ZeRO dir, run dir), a Hugging Face model
            directory, or a hub name (gpt2, t5-small, facebook/bart-base, Helsinki-NLP/opus-mt-en-fr).
        random_init: With ``init``: keep its architecture, config and tokenizer but start from
            freshly drawn weights (the no-pretraining control of the same model: "does
            pretraining help?" compares the two at equal fine-tuning steps).
        scratch: Instead of ``init``: the architecture of a model trained from scratch, e.g.
            ``{model_type: rnn_seq2seq, cell: gru, attention: bahdanau}`` or ``{model_type: t5,
            d_model: 256}`` (options: ``--model.scratch.help RNNArch``, ``T5Arch``, ``MarianArch``, ``GPT2Arch``).
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
        label_smoothing: Training loss smoothed towards the uniform distribution by this much (0.1
            in the transformer NMT recipes: Vaswani et al. 2017, fairseq, JoeyNMT); 0 = plain
            cross-entropy. Reported losses and scores are unaffected.
        peft: With ``init``: freeze the model and train LoRA adapters instead, e.g. ``{method: lora,
            r: 16, alpha: 32, dropout: 0.05, target_modules: auto}`` (`finetune.adapters.PeftOptions`).
            Checkpoints then hold only the adapter weights; ``finetune export`` writes the adapter
            (or, with ``--merge true``, the merged model).
    """

    stage = "finetune"

    def __init__(
        self,
        init: str | None = None,
        random_init: bool = False,
        scratch: ScratchArch | None = None,
        tokenizer: str | None = None,
        tokenizer_vocab_size: int = 8000,
        lr: float = 1e-4,
        min_lr_ratio: float = 0.1,
        warmup_steps: int = 0,
        weight_decay: float = 0.0,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        max_new_tokens: int = 64,
        label_smoothing: float = 0.0,
        peft: PeftOptions | None = None,
    ) -> None:
        super().__init__()
        if num_beams < 1:
            raise ValueError(f"model.num_beams must be >= 1, got {num_beams}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"model.label_smoothing must be in [0, 1), got {label_smoothing}")
        if (init is None) == (scratch is None):
            raise ValueError("give exactly one of model.init (a pretrained model) and model.scratch (a config "
                             "to train from scratch)")
        if random_init and init is None:
            raise ValueError("model.random_init needs model.init (the model whose architecture and tokenizer "
                             "to keep); with model.scratch every weight is random already")
        if peft is not None and init is None:
            raise ValueError("model.peft needs model.init: adapters train on top of pretrained weights, which a "
                             "model trained from scratch (model.scratch) does not have")
        if peft is not None and random_init:
            raise ValueError("model.peft with model.random_init would train adapters on frozen random weights; "
                             "drop one of them")
        peft = peft_options(peft) if peft is not None else None
        self.scratch: ScratchArch | None = scratch_arch(scratch) if scratch is not None else None
        # Primitives only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters({"init": init, "random_init": random_init, "scratch": self.scratch.to_dict() if self.scratch else None,
                                   "tokenizer": tokenizer, "tokenizer_vocab_size": tokenizer_vocab_size, "lr": lr,
                                   "min_lr_ratio": min_lr_ratio, "warmup_steps": warmup_steps,
                                   "weight_decay": weight_decay, "num_beams": num_beams,
                                   "length_penalty": length_penalty, "max_new_tokens": max_new_tokens,
                                   "label_smoothing": label_smoothing, "peft": asdict(peft) if peft else None})
        if init is not None:
            loaded = load_pretrained(init, random_init=random_init,
                                     quantize_4bit=peft is not None and peft.method == "qlora")
            self.model, self.tokenizer = loaded.model, loaded.tokenizer
            self.kind = loaded.kind
            if peft is not None:
                if is_adapted(self.model):
                    raise ValueError(f"model.peft: model.init={init!r} already holds an adapter (fitting it without "
                                     "model.peft continues that adapter); to add a new one, export it with --merge true "
                                     "and start from the merged model")
                self.model = add_adapter(self.model, peft, loaded.reference)
        else:
            self.kind = "decoder" if isinstance(self.scratch, GPT2Arch) else "encoder_decoder"
        # An adapter run's checkpoints hold only the adapter; the base comes from model.init again, so
        # loading is not strict (checkpoint_loaded checks the adapter's shape and the base's weights).
        self.strict_loading = not self.adapted
        if self.adapted:
            self.register_state_dict_post_hook(drop_base_weights)
        self._base_fingerprint: str | None = None
        self._predictions: list[tuple[int, str, list[str]]] = []
        self.last_results: dict[str, Any] = {}

    def build_from_scratch(self, task: Any, train_split: str, run_dir: str | Path) -> None:
        """Tokenizer and freshly initialised model for ``model.scratch`` (a trained tokenizer needs
        the task's data: the CLI calls this before it connects the data module)."""
        if self.model is not None:
            return
        self.tokenizer = scratch_tokenizer(self.hparams.tokenizer, task, train_split,
                                           self.hparams.tokenizer_vocab_size, run_dir)
        self.model = build_scratch_model(self.scratch, self.tokenizer)

    def model_kind(self) -> str | None:
        return self.kind

    # ---- adapters -----------------------------------------------------------------------------
    @property
    def adapted(self) -> bool:
        return self.model is not None and is_adapted(self.model)

    @property
    def base_fingerprint(self) -> str:
        if self._base_fingerprint is None:  # hashed once: the base is frozen
            self._base_fingerprint = base_fingerprint(self.model)
        return self._base_fingerprint

    def on_fit_start(self) -> None:
        # from_pretrained returns a model in eval mode, and Lightning (2.2+) keeps each module's mode:
        # without this, a released checkpoint (GPT-2: dropout 0.1) would fine-tune with dropout off,
        # unlike the same architecture built fresh (--model.scratch, --model.random_init).
        self.model.train()

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        if self.adapted and hasattr(strategy, "exclude_frozen_parameters"):
            strategy.exclude_frozen_parameters = True  # else DeepSpeed saves the frozen weights' fragments too

    def extra_metadata(self) -> dict:
        # The weights are the adapter's only (drop_base_weights): say what rebuilds the rest.
        return {ADAPTER_KEY: adapter_metadata(self.model, self.base_fingerprint)} if self.adapted else {}

    def checkpoint_loaded(self, meta: dict) -> None:
        """An adapter checkpoint resumes only an adapter run with the same adapter shapes, on the same
        base weights (the loading is not strict, so this is where a mismatch is caught)."""
        adapter = meta.get(ADAPTER_KEY)
        if self.adapted != (adapter is not None):
            raise CheckpointError("the checkpoint holds " + ("a LoRA adapter without its base weights, but this run "
                                  "fine-tunes every weight: resume with the run's model.peft" if adapter else
                                  "every weight, but this run trains an adapter (model.peft): resume without it"))
        if adapter is not None:
            ours = asdict(adapter_options(self.model))
            for name in ("r", "alpha", "target_modules"):
                if adapter[name] != ours[name]:
                    raise CheckpointError(f"the checkpoint's adapter has {name}={adapter[name]}, this run's "
                                          f"model.peft gives {ours[name]}: resume with the run's model.peft")
            check_base(self.model, adapter, "checkpoint")

    # ---- training -----------------------------------------------------------------------------
    def trained_context(self, length: int) -> None:
        """Fine-tuning past the usable context (an explicit data.max_length) trains those positions:
        the checkpoint and its export then declare the longer context (the CLI calls this)."""
        record_trained_context(self.model.config, length)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # A decoder would fill a KV cache it never reads (config.use_cache), and a cache turns off
        # transformers' packed-sequence masks (finetune.packing).
        out = self.model(**batch, **({"use_cache": False} if self.kind == "decoder" else {}))
        loss = out.loss  # mean over completion/label tokens (-100 elsewhere)
        smoothing = self.hparams.get("label_smoothing", 0.0)  # absent from older checkpoints
        if smoothing:
            logits, labels = out.logits, batch["labels"]  # (B, T, V), (B, T)
            if self.kind == "decoder":  # the model predicts token t + 1 at position t
                logits, labels = logits[:, :-1], labels[:, 1:]
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                   label_smoothing=smoothing)
        self.log_train_loss(loss)
        return loss

    # ---- generation + scoring -----------------------------------------------------------------
    @torch.no_grad()
    def generate_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, stop: list[str]) -> list[str]:
        """Completions for a batch of prompts (left-padded for decoder-only), cut at ``stop``."""
        tok = self.tokenizer
        synced = generation_needs_sync(self.trainer)
        # Stop strings matter for decoder-only models continuing a prompt; seq2seq targets end at EOS
        # (the stop strings are still cut from the text below).
        stop_early = stop if self.kind == "decoder" else []
        out = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=False, num_beams=self.hparams.num_beams,
            length_penalty=self.hparams.length_penalty, max_new_tokens=self.hparams.max_new_tokens,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            **({"stop_strings": stop_early, "tokenizer": tok} if stop_early else {}),
            synced_gpus=synced,  # ZeRO-3: weights are gathered collectively on every step
        )  # (B, T_prompt + new) for decoder-only, (B, 1 + new) for encoder-decoder
        new = out[:, input_ids.shape[1]:] if self.kind == "decoder" else out
        return [strip_completion(text, stop) for text in tok.batch_decode(new, skip_special_tokens=True)]

    def _eval_step(self, batch: dict[str, Any]) -> None:
        self._scoring = batch["scoring"]
        texts = self.generate_texts(batch["input_ids"], batch["attention_mask"], list(self._scoring.stop))
        self._predictions.extend(zip(batch["index"].tolist(), texts, batch["references"]))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def _gathered_predictions(self) -> tuple[list[str], list[list[str]]]:
        local, self._predictions = self._predictions, []
        if dist.is_available() and dist.is_initialized() and self.trainer.world_size > 1:
            parts: list[Any] = [None] * self.trainer.world_size
            dist.all_gather_object(parts, local)
            local = [p for part in parts for p in part]
        by_index = {index: (text, refs) for index, text, refs in local}  # the sampler's padding repeats items
        if sorted(by_index) != list(range(len(by_index))):
            raise RuntimeError(f"predictions for items {sorted(set(range(max(by_index, default=-1) + 1)) - set(by_index))[:5]} "
                               "are missing")
        ordered = [by_index[i] for i in range(len(by_index))]
        return [text for text, _ in ordered], [refs for _, refs in ordered]

    def score(self) -> dict[str, Any]:
        """Gather predictions, score them against the items' references; returns the results."""
        predictions, references = self._gathered_predictions()
        scoring = self._scoring
        metrics = compute_metrics(scoring.metric, predictions, references, lang=scoring.lang)
        intervals = confidence_intervals(scoring.metric, predictions, references, lang=scoring.lang)
        primary = PRIMARY_METRIC[scoring.metric]
        self.last_results = {"model": self.hparams.init, "kind": self.kind, "metric": scoring.metric,
                             "score": metrics[primary], "score_name": primary, "metrics": metrics,
                             "ci95": intervals["intervals"], "ci_method": intervals["method"],
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
            self.log("test/n_items", float(len(results["predictions"])), sync_dist=True)
            self.log("test/n_total", float(self._scoring.n_total), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self._predictions = []
            return
        self._log_scores("val", self.score())

    def on_test_epoch_end(self) -> None:
        self._log_scores("test", self.score())
