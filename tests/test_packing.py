"""Packed fine-tuning batches (`--data.packing true`): rows of whole examples that never see each
other. The property that matters: a packed batch's loss equals the loss of the same examples
unpacked (same tokens, same weights), and each example's logits are the ones it has alone."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from common.resumable_loader import ResumablePackedSampler
from common.user_errors import report_user_errors
from finetune.cli import main as finetune_cli
from finetune.data import FinetuneDataModule
from finetune.packing import IGNORE_INDEX, check_packing, collate_packed
from tests.tiny_hf import save_tiny_model

ROWS = [("I am happy.", "Je suis content."), ("The cat sleeps on the warm mat all day.", "Le chat dort."),
        ("Hi.", "Salut."), ("Where is Paris? It is in France, of course.", "Où est Paris ?"),
        ("Yes.", "Oui."), ("The meeting is moved to friday because of the storm.", "La réunion est déplacée.")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_pack")
    return {kind: save_tiny_model(kind, root / kind) for kind in ("gpt2", "t5")}


def _lengths(n: int = 2000, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [max(2, int(rng.lognormvariate(3.0, 0.6))) for _ in range(n)]  # ~20 tokens, long tail


def test_rows_fit_the_context_and_cover_each_example_at_most_once() -> None:
    lengths = _lengths()
    sampler = ResumablePackedSampler(lengths, row_tokens=128, rows_per_batch=4, seed=3)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == sampler.batches_per_epoch and all(len(b) == 4 for b in batches)
        rows = [row for b in batches for row in b]
        assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
        flat = [i for row in rows for i in row]
        assert len(flat) == len(set(flat)) and len(flat) >= 0.95 * len(lengths)
        # Next-fit loses little room with examples much shorter than the row.
        assert sum(lengths[i] for i in flat) / (128 * len(rows)) > 0.8
    a, b = (ResumablePackedSampler(lengths, 128, 4, seed=1) for _ in range(2))
    a.set_epoch(1), b.set_epoch(1)
    assert list(a) == list(b)  # the order is a function of seed and epoch
    resumed = ResumablePackedSampler(lengths, 128, 4, seed=1)
    resumed.resume(1, 5)
    assert list(resumed) == list(a)[5:]
    ranks = [ResumablePackedSampler(lengths, 128, 4, num_replicas=2, rank=r, seed=1) for r in (0, 1)]
    seen = [{i for batch in r for row in batch for i in row} for r in ranks]
    assert not seen[0] & seen[1] and len(ranks[0]) == len(ranks[1])
    with pytest.raises(ValueError, match="an example of 300 tokens does not fit a row of 128"):
        ResumablePackedSampler([10, 300], 128, 1)
    with pytest.raises(ValueError, match="fewer than one batch of 4 packed rows"):
        ResumablePackedSampler([10, 20], 128, 4)


def test_positions_restart_and_each_examples_first_token_is_no_target() -> None:
    rows = [[{"prompt_ids": [5, 6], "completion_ids": [7, 2]}, {"prompt_ids": [8], "completion_ids": [9, 2]}],
            [{"prompt_ids": [], "completion_ids": [5, 2]}]]  # an empty prompt: its first target is dropped
    batch = collate_packed(rows, pad_id=0)
    assert set(batch) == {"input_ids", "position_ids", "labels"}  # no attention mask: positions keep them apart
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2, 8, 9, 2], [5, 2, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 7, 2, IGNORE_INDEX, 9, 2],
                                        [IGNORE_INDEX, 2] + [IGNORE_INDEX] * 5]


def _batches(tiny_dir: Path, packing: bool, max_length: int = 64) -> tuple[dict, list]:
    """The training batch of ROWS through the data module (padded, or packed into rows of ``max_length``)."""
    from finetune.pretrained import load_pretrained
    from finetune.train_examples import TrainExamples

    loaded = load_pretrained(str(tiny_dir))
    data = FinetuneDataModule("tatoeba_en_fr", packing=packing)
    data.tokenizer, data.kind, data.max_length = loaded.tokenizer, loaded.kind, max_length
    data.template = data.task.template(loaded.kind)
    rows = [{"id": str(i), "source": s, "target": t, "references": [t]} for i, (s, t) in enumerate(ROWS)]
    examples = TrainExamples(rows, data.task, data.template, loaded.tokenizer, loaded.kind, max_length, 32)
    if not packing:
        return data.collate_train([examples[i] for i in range(len(rows))]), []
    sampler = ResumablePackedSampler([examples.length(i) for i in range(len(rows))], max_length, 1)
    packed_rows = [row for batch in sampler._batches(0) for row in batch]
    batch = data.collate_train([[examples[i] for i in row] for row in packed_rows])
    return batch, packed_rows


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_a_packed_batch_has_the_loss_of_the_same_examples_unpacked(tiny: dict[str, Path], smoothing: float) -> None:
    from finetune.system import FinetuneSystem

    system = FinetuneSystem(init=str(tiny["gpt2"]), label_smoothing=smoothing)
    system.log_train_loss = lambda loss: None  # no trainer attached
    system.model.eval()  # dropout off: the same weights score both batches
    padded, _ = _batches(tiny["gpt2"], packing=False)
    packed, rows = _batches(tiny["gpt2"], packing=True)
    assert len(rows) < len(ROWS) and sorted(i for r in rows for i in r) == list(range(len(ROWS)))  # all, packed
    # Same tokens, same targets: only the layout differs.
    assert (padded["labels"] != IGNORE_INDEX).sum() == (packed["labels"] != IGNORE_INDEX).sum()
    with torch.no_grad():
        loss_padded, loss_packed = system.training_step(padded, 0), system.training_step(packed, 0)
        # Each example's logits in its packed row equal its logits in the padded batch.
        logits_packed = system.model(**{k: v for k, v in packed.items() if k != "labels"}, use_cache=False).logits
        logits_padded = system.model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-6)
    n_real = padded["attention_mask"].sum(1)
    for b, row in enumerate(rows):
        start = 0
        for i in row:
            n = int(n_real[i])
            torch.testing.assert_close(logits_packed[b, start:start + n], logits_padded[i, :n], rtol=1e-4, atol=1e-5)
            start += n


def test_the_positions_alone_keep_examples_apart() -> None:
    """Without the restarts (one running position per row) the same packed batch gives another loss:
    the equality above is the masks' doing, not a coincidence of the data."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
    rows = [[{"prompt_ids": [5, 6, 7], "completion_ids": [8, 2]}, {"prompt_ids": [9, 10], "completion_ids": [11, 2]}]]
    batch = collate_packed(rows, pad_id=0)
    with torch.no_grad():
        kept_apart = model(**batch, use_cache=False).loss
        running = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
    assert not torch.isclose(kept_apart, running, rtol=1e-4)


def test_models_that_cannot_keep_examples_apart_are_refused(tiny: dict[str, Path]) -> None:
    from finetune.pretrained import load_pretrained

    gpt2 = load_pretrained(str(tiny["gpt2"]))
    check_packing(gpt2.model, gpt2.kind)  # passes: transformers' GPT-2 reads the restarts
    t5 = load_pretrained(str(tiny["t5"]))
    with pytest.raises(ValueError, match=r"data.packing: T5ForConditionalGeneration is an encoder-decoder"):
        check_packing(t5.model, t5.kind)

    class Leaky(torch.nn.Module):
        """A decoder whose every position sees all tokens before it, whatever the position ids say."""

        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(20, 4)

        def get_input_embeddings(self) -> torch.nn.Embedding:
            return self.emb

        def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, use_cache: bool) -> object:
            return type("Out", (), {"logits": self.emb(input_ids).cumsum(1)})()

    with pytest.raises(ValueError, match="Leaky does not keep packed examples apart"):
        check_packing(Leaky(), "decoder")


def test_packed_fit_is_refused_in_one_line_for_an_encoder_decoder(tiny: dict[str, Path], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    def fit(*extra: str) -> None:
        finetune_cli(["fit", "--model.init", str(tiny["t5"]), "--data.task", "tatoeba_en_fr", "--data.packing", "true",
                      "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path / "run"),
                      "--trainer.logger", "false", "--trainer.accelerator", "cpu", *extra])

    with pytest.raises(SystemExit):
        report_user_errors(fit)
    err = capsys.readouterr().err
    assert "data.packing: T5ForConditionalGeneration is an encoder-decoder" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "config.yaml").exists()
    with pytest.raises(SystemExit):
        report_user_errors(lambda: fit("--data.batch_tokens", "64"))
    assert "data.packing and data.batch_tokens" in capsys.readouterr().err
