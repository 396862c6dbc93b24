"""Tests for pretrain.samples.GenerationSamples with a tiny random GPT-2 and a tiny BPE tokenizer."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from pretrain.samples import GenerationSamples

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "In the beginning was the word.",
             "First Citizen: before we proceed any further, hear me speak."] * 4


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (every string encodes) with distinct <eos> and <pad>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def tiny_gpt2(tokenizer) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=128,
                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(cfg)


def fake(step: int, model, tokenizer, loggers=(), sanity=False, rank0=True):
    # Lightning logs a validation after step N at logging step N - 1 (common.wandb_logger.logging_step).
    trainer = SimpleNamespace(global_step=step, sanity_checking=sanity, is_global_zero=rank0,
                              loggers=list(loggers), strategy=SimpleNamespace(),
                              fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=step - 1)))
    return trainer, SimpleNamespace(model=model, tokenizer=tokenizer)


def test_samples_deterministic_and_rng_untouched(tokenizer):
    model = tiny_gpt2(tokenizer).train()
    cb = GenerationSamples(every_n_steps=10, max_new_tokens=8)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    cb.on_validation_epoch_end(*fake(10, model, tokenizer))
    assert torch.equal(torch.get_rng_state(), rng)  # the training stream did not move
    assert model.training  # eval during sampling, restored after
    first = [r["completion"] for r in cb.last_samples]
    assert [r["prompt"] for r in cb.last_samples] == ["The", "In the beginning", "First Citizen:"]
    assert all(isinstance(c, str) for c in first) and any(first)
    assert {r["step"] for r in cb.last_samples} == {10}

    cb.on_validation_epoch_end(*fake(20, model, tokenizer))
    assert [r["completion"] for r in cb.last_samples] == first  # same seed, same weights
    other = GenerationSamples(max_new_tokens=8, seed=1).generate(model, tokenizer)
    assert other != first


def test_schedule_sanity_and_rank(tokenizer):
    model = tiny_gpt2(tokenizer)
    cb = GenerationSamples(prompts=["The"], every_n_steps=10, max_new_tokens=2)
    cb.on_validation_epoch_end(*fake(9, model, tokenizer))
    assert cb.last_samples == []  # no multiple of 10 crossed yet
    cb.on_validation_epoch_end(*fake(10, model, tokenizer, sanity=True))
    assert cb.last_samples == []
    cb.on_validation_epoch_end(*fake(12, model, tokenizer, rank0=False))
    assert cb.last_samples == [] and cb.state_dict() == {"last_step": 12}  # ranks agree on state
    cb.on_validation_epoch_end(*fake(15, model, tokenizer))
    assert cb.last_samples == []  # 10 was already crossed at step 12
    cb.on_validation_epoch_end(*fake(21, model, tokenizer))
    assert [r["step"] for r in cb.last_samples] == [21]
    cb.on_train_end(*fake(21, model, tokenizer))  # already sampled at this step
    cb.on_train_end(*fake(23, model, tokenizer))
    assert [r["step"] for r in cb.last_samples] == [23]


class RecordingWandb(WandbLogger):
    """isinstance-compatible WandbLogger that records log_text calls instead of starting a run."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def log_text(self, **kwargs) -> None:
        self.calls.append(kwargs)


def test_wandb_table(tokenizer):
    model = tiny_gpt2(tokenizer)
    wandb = RecordingWandb()
    GenerationSamples(every_n_steps=5, max_new_tokens=2).on_validation_epoch_end(
        *fake(5, model, tokenizer, loggers=[wandb]))
    (call,) = wandb.calls
    assert call["key"] == "samples" and call["columns"] == ["step", "prompt", "completion"]
    assert call["step"] == 4  # beside the validation metrics of step 5, which Lightning logs at 4
    assert [row[:2] for row in call["data"]] == [["5", "The"], ["5", "In the beginning"],
                                                  ["5", "First Citizen:"]]


@pytest.mark.parametrize("kwargs, msg", [
    ({"prompts": []}, "prompts must be a non-empty list"),
    ({"prompts": ["ok", ""]}, "prompts must be a non-empty list"),
    ({"every_n_steps": 0}, "every_n_steps must be >= 1, got 0"),
    ({"temperature": 0.0}, "temperature must be > 0"),
])
def test_bad_arguments(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        GenerationSamples(**kwargs)


class TinyLM(pl.LightningModule):
    """A GPT-2 with dropout on, so any extra draw from the training RNG changes the weights."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.model = tiny_gpt2(tokenizer)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def _loader(self):
        ids = self.tokenizer(SENTENCES[:4], padding="max_length", max_length=16, truncation=True,
                             return_tensors="pt")["input_ids"]
        return torch.utils.data.DataLoader([{"input_ids": row} for row in ids], batch_size=2)

    train_dataloader = val_dataloader = _loader


def test_real_fit_samples_do_not_perturb_training(tokenizer, tmp_path):
    def run(callbacks):
        torch.manual_seed(7)
        module = TinyLM(tokenizer)
        trainer = pl.Trainer(accelerator="cpu", max_steps=3, val_check_interval=1, callbacks=callbacks,
                             logger=False, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, default_root_dir=tmp_path)
        trainer.fit(module)
        return module

    cb = GenerationSamples(prompts=["The"], every_n_steps=2, max_new_tokens=4)
    with_samples, without = run([cb]), run([])
    assert cb.last_samples and cb.last_samples[0]["step"] == 3  # step 2, then the end
    for a, b in zip(with_samples.parameters(), without.parameters()):
        assert torch.equal(a, b)
