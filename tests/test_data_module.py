"""PretrainDataModule: prepare/setup/dataloaders on a tiny corpus, and the shipped corpus config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretrain.corpus import CorpusConfig, CorpusSource
from common.resumable_loader import ResumableDataLoader
from pretrain.data import PretrainDataModule


def _datamodule(tiny_corpus_files, tmp_path, **kwargs) -> PretrainDataModule:
    sources = [CorpusSource(local=[str(tiny_corpus_files["txt"]), str(tiny_corpus_files["txt2"])]),
               CorpusSource(local=str(tiny_corpus_files["jsonl"]))]
    corpus = CorpusConfig(sources=sources, out_dir=str(tmp_path / "corpus"), bpe_vocab_size=300,
                          val_fraction=0.3, holdout_block=2, num_proc=1)
    dm = PretrainDataModule(corpus, **{"block_size": 8, "batch_size": 4, "seed": 5, **kwargs})
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.fixture
def datamodule(tiny_corpus_files, tmp_path):
    return _datamodule(tiny_corpus_files, tmp_path)


@pytest.fixture
def span_datamodule(tiny_corpus_files, tmp_path):
    return _datamodule(tiny_corpus_files, tmp_path, objective="span_corruption", block_size=32, batch_size=2,
                       noise_density=0.3, mean_noise_span_length=2.0, num_sentinels=20)


def test_dataloaders_yield_shifted_blocks(datamodule):
    dm = datamodule
    assert dm.vocab_size == len(dm.tokenizer) == 300
    assert dm.tokenizer.pad_token_id != dm.tokenizer.eos_token_id
    assert dm.manifest["splits"]["val"]["tokens"] > 8
    train = dm.train_dataloader()
    batches = list(train)
    n_train = dm.manifest["splits"]["train"]["tokens"]
    assert len(batches) == len(train) == max(1, n_train // (8 * 4))
    for batch in batches:
        assert batch["input_ids"].shape == batch["targets"].shape == (4, 8)
        assert batch["input_ids"].dtype == torch.long
        assert torch.equal(batch["input_ids"][:, 1:], batch["targets"][:, :-1])
        assert int(batch["input_ids"].max()) < dm.vocab_size
    # Same seed, fresh loader: same blocks (pure function of seed, epoch, index).
    again = next(iter(dm.train_dataloader()))
    assert torch.equal(again["input_ids"], batches[0]["input_ids"])
    val = list(dm.val_dataloader())
    n_val = dm.manifest["splits"]["val"]["tokens"]
    assert sum(b["input_ids"].shape[0] for b in val) == (n_val - 1) // 8
    assert all(b["input_ids"].shape[1] == 8 for b in val)


def test_train_loader_state_is_checked_on_resume(datamodule):
    loader = datamodule.train_dataloader()
    assert isinstance(loader, ResumableDataLoader)
    state = loader.state_dict()
    assert state["seed"] == 5 and state["block_size"] == 8
    loader.load_state_dict(state)
    with pytest.raises(ValueError, match="block_size: checkpoint 16, now 8"):
        loader.load_state_dict({**state, "block_size": 16})


def test_setup_before_prepare_names_the_manifest(tmp_path):
    dm = PretrainDataModule(CorpusConfig(sources=[CorpusSource(local="x.txt")], out_dir=str(tmp_path / "none")))
    with pytest.raises(FileNotFoundError, match="manifest"):
        dm.setup("fit")


def test_shipped_tiny_corpus(shipped_corpus):
    out_dir, manifest = shipped_corpus  # prepare_main on configs/data/tiny_corpus.yaml (tests/conftest.py)
    assert manifest["splits"]["train"]["tokens"] > 500_000
    assert manifest["splits"]["val"]["tokens"] > 10_000
    assert manifest["tokenizer"]["vocab_size"] <= 8192 + 2
    assert manifest["dtype"] == "uint16"
    dm = PretrainDataModule(CorpusConfig(sources=[], out_dir=str(out_dir)), block_size=128, batch_size=16)
    dm.setup("fit")  # reading a prepared corpus needs no sources
    assert next(iter(dm.val_dataloader()))["input_ids"].shape == (16, 128)


class _Boom(RuntimeError):
    pass


def _fit(dm: PretrainDataModule, ckpt_dir: Path, max_steps: int, crash_at: int | None = None,
         ckpt_path: str | None = None) -> list[int]:
    """Fit a parameter-free-ish module that records each batch's first block; returns the records."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    seen: list[int] = []

    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch, batch_idx):
            seen.append(hash(tuple(batch["input_ids"].flatten().tolist())))
            return self.w * batch["input_ids"].float().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    class Crash(L.Callback):  # runs before ModelCheckpoint (Lightning orders checkpoints last)
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == crash_at:
                raise _Boom

    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, accelerator="cpu", num_sanity_val_steps=0,
                        callbacks=[Crash(), ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_last=True,
                                                            save_top_k=0)])
    try:
        trainer.fit(Recorder(), dm, ckpt_path=ckpt_path)
    except _Boom:
        pass
    return seen


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_mid_epoch_resume_is_exact(datamodule, tmp_path):
    dm = datamodule
    per_epoch = len(dm.train_dataloader())
    max_steps, crash_at = per_epoch + 3, per_epoch + 2  # crash mid-way through the second epoch
    assert per_epoch >= 3
    full = _fit(dm, tmp_path / "a", max_steps)
    before = _fit(dm, tmp_path / "b", max_steps, crash_at=crash_at)
    # The crash hits before that step's checkpoint: last.ckpt holds crash_at - 1 finished batches.
    after = _fit(dm, tmp_path / "b", max_steps, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert len(full) == max_steps
    assert before[: crash_at - 1] + after == full


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_span_corruption_mid_epoch_resume_is_exact(span_datamodule, tmp_path):
    dm = span_datamodule
    per_epoch = len(dm.train_dataloader())
    max_steps, crash_at = per_epoch + 3, per_epoch + 2
    assert per_epoch >= 3
    full = _fit(dm, tmp_path / "a", max_steps)
    before = _fit(dm, tmp_path / "b", max_steps, crash_at=crash_at)
    after = _fit(dm, tmp_path / "b", max_steps, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert len(full) == max_steps
    assert before[: crash_at - 1] + after == full
