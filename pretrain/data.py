"""Lightning data module for pre-training on a prepared token-shard corpus."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import lightning as L
import torch
from torch.utils.data import DataLoader

from common.resumable_loader import ResumableDataLoader
from pretrain.corpus import CorpusConfig
from pretrain.prepare import prepare_corpus
from pretrain.shards import ContiguousBlocks, RandomBlocks, ResumableBlockSampler, TokenStream, load_manifest
from pretrain.span_corruption import (
    ContiguousSpanCorruptionBlocks,
    SpanCorruptionBlocks,
    compute_input_and_target_lengths,
)

Objective = Literal["causal_lm", "span_corruption"]


class ModelInputs(NamedTuple):
    """What the model takes from the data (`PretrainSystem.configure_model`): the corpus tokenizer
    (sentinels added for span corruption), the context it trains at, the batches' objective."""

    tokenizer: Any
    context_length: int
    objective: Objective


class PretrainDataModule(L.LightningDataModule):
    """Random blocks of a prepared corpus for training, contiguous blocks for validation.

    The same prepared corpus serves both objectives: ``causal_lm`` (GPT: shifted blocks) and
    ``span_corruption`` (T5: sentinel tokens are added to the tokenizer at setup; the shards never
    contain them).
    """

    def __init__(self, corpus: CorpusConfig, block_size: int = 256, batch_size: int = 16, num_workers: int = 0,
                 seed: int = 1234, objective: Objective = "causal_lm", noise_density: float = 0.15,
                 mean_noise_span_length: float = 3.0, num_sentinels: int = 100) -> None:
        """Random blocks of a prepared corpus for training, contiguous blocks for validation.

        Args:
            corpus: the corpus to prepare (once, idempotently) and read.
            block_size: tokens per training/validation sequence (T); for span_corruption the encoder
                input length (the raw window and the label length follow from the noise settings,
                e.g. 512 -> 568 raw tokens, 114 labels).
            batch_size: sequences per batch on each device (B).
            num_workers: DataLoader worker processes (0 = load in the training process).
            seed: seed of the random block offsets (together with the epoch and the sample index);
                for span_corruption also of the noise masks.
            objective: "causal_lm" (GPT next-token blocks: input_ids, targets) or "span_corruption"
                (T5 denoising: input_ids, labels). The CLI sets it from the model class
                (``model.class_path``), so a YAML never names it.
            noise_density: span_corruption: fraction of raw tokens masked (T5: 0.15).
            mean_noise_span_length: span_corruption: mean length of a masked span (T5: 3.0).
            num_sentinels: span_corruption: sentinel tokens <extra_id_0>... added to the tokenizer;
                must cover the noise spans of one example.
        """
        super().__init__()
        if objective not in ("causal_lm", "span_corruption"):
            raise ValueError(f"data.objective must be 'causal_lm' or 'span_corruption', got {objective!r}")
        if num_sentinels < 1:
            raise ValueError(f"data.num_sentinels must be >= 1, got {num_sentinels}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if block_size < 2:
            raise ValueError(f"data.block_size must be >= 2 (an input and its next token), got {block_size}")
        self.corpus, self.block_size, self.batch_size = corpus, block_size, batch_size
        self.num_workers, self.seed, self.objective = num_workers, seed, objective
        self.noise_density, self.mean_noise_span_length = noise_density, mean_noise_span_length
        self.num_sentinels = num_sentinels
        # Span corruption: encoder input / label lengths (None for causal_lm). Computed now so bad
        # settings fail at config time, before any corpus preparation.
        self.inputs_length: int | None = None
        self.targets_length: int | None = None
        self.tokens_length: int | None = None
        if objective == "span_corruption":
            self.tokens_length, self.targets_length = compute_input_and_target_lengths(
                block_size, noise_density, mean_noise_span_length)
            self.inputs_length = block_size
        self.sentinel_ids: list[int] = []  # index k = id of <extra_id_k> (set up for span_corruption)
        self.tokenizer = None
        self._manifest: dict | None = None
        self._streams: dict[str, TokenStream] = {}

    def prepare_data(self) -> None:
        """Tokenize the corpus if needed (Lightning runs this on one process per node)."""
        prepare_corpus(self.corpus)

    def setup(self, stage: str | None = None) -> None:
        """Load the manifest, the corpus tokenizer and the split streams."""
        from transformers import AutoTokenizer

        from pretrain.shards import check_tokenizer

        if self.tokenizer is not None:
            return
        out_dir = self.corpus.out_dir
        self._manifest = load_manifest(out_dir)
        tokenizer = AutoTokenizer.from_pretrained(f"{out_dir}/tokenizer")
        check_tokenizer(self._manifest, tokenizer)  # the shards' ids must mean what the model is told
        if self.objective == "span_corruption":
            # After the check: sentinels get ids >= the corpus vocabulary, so no shard token is one.
            from common.tokenizer import add_sentinel_tokens

            self.sentinel_ids = add_sentinel_tokens(tokenizer, self.num_sentinels)
            if tokenizer.eos_token_id is None:
                raise ValueError(f"the corpus tokenizer in {out_dir}/tokenizer has no EOS token; span corruption "
                                 "ends inputs and labels with EOS")
        self._streams = {split: TokenStream(out_dir, split) for split in ("train", "val")}
        self.tokenizer = tokenizer

    @property
    def manifest(self) -> dict:
        """The corpus manifest (after setup)."""
        if self._manifest is None:
            raise RuntimeError("PretrainDataModule.setup() has not run yet")
        return self._manifest

    @property
    def vocab_size(self) -> int:
        """Embedding rows the model needs: ``len(tokenizer)`` (includes added tokens: pad, sentinels)."""
        if self.tokenizer is None:
            raise RuntimeError("PretrainDataModule.setup() has not run yet")
        return len(self.tokenizer)

    def model_inputs(self) -> ModelInputs:
        """The tokenizer, context length and objective a model must be built for (after setup)."""
        if self.tokenizer is None:
            raise RuntimeError("PretrainDataModule.setup() has not run yet")
        return ModelInputs(self.tokenizer, self.block_size, self.objective)

    @property
    def sequence_tokens(self) -> int:
        """Corpus tokens one training sequence consumes: GPT's block; T5's raw window, which span
        corruption shortens to ``block_size`` encoder tokens (512 -> 568 raw tokens)."""
        return self.tokens_length if self.objective == "span_corruption" else self.block_size

    def train_dataloader(self) -> ResumableDataLoader:
        """Random-offset blocks; resumes mid-epoch exactly when Lightning restored a checkpoint."""
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if self.objective == "span_corruption":
            dataset = SpanCorruptionBlocks(self._stream("train"), self.block_size, self.sentinel_ids,
                                           self.tokenizer.eos_token_id, self.noise_density,
                                           self.mean_noise_span_length, seed=self.seed)
        else:
            dataset = RandomBlocks(self._stream("train"), self.block_size, seed=self.seed)
        sampler = ResumableBlockSampler(dataset, self.batch_size, num_replicas=world, rank=rank, seed=self.seed)
        if trainer is not None:
            sampler.resume_from(trainer)  # exact mid-epoch position after a restart
        state = {"seed": self.seed, "block_size": self.block_size, "batch_size": self.batch_size,
                 "world_size": world, "corpus": self.manifest["inputs"]["fingerprint"], "objective": self.objective}
        if self.objective == "span_corruption":
            state.update(noise_density=self.noise_density, mean_noise_span_length=self.mean_noise_span_length,
                         num_sentinels=self.num_sentinels)
        return ResumableDataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                                   pin_memory=torch.cuda.is_available(), drop_last=True, loader_state=state,
                                   state_defaults={"objective": "causal_lm"})  # checkpoints from before T5

    def val_dataloader(self) -> DataLoader:
        """Consecutive non-overlapping blocks covering the validation split, in order (fixed masks)."""
        if self.objective == "span_corruption":
            # Masks seeded independently of data.seed: val scores the same examples across runs.
            dataset = ContiguousSpanCorruptionBlocks(self._stream("val"), self.block_size, self.sentinel_ids,
                                                     self.tokenizer.eos_token_id, self.noise_density,
                                                     self.mean_noise_span_length)
        else:
            dataset = ContiguousBlocks(self._stream("val"), self.block_size)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available())

    def _stream(self, split: str) -> TokenStream:
        if split not in self._streams:
            raise RuntimeError(f"PretrainDataModule: no {split} stream; call prepare_data() and setup() first")
        return self._streams[split]
