"""Scores measured where they are valid (issue 10): inside the trained context, one truncation rule
for training and evaluation, the whole split by default, demonstrations that are not near-copies of
the evaluated item, and an overlap report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer, GPT2Config, T5Config

from common.model_context import TRAINED_CONTEXT_KEY, position_limit, usable_context
from common.user_errors import report_user_errors
from finetune.cli import main as finetune_cli
from finetune.eval_items import EvalItemBuilder
from finetune.few_shot import leakage_key, normalize_text
from finetune.tasks import load_split, load_task, task_from_dict
from finetune.truncation import answer_span, fit_long_field
from pretrain.cli import main as pretrain_cli
from tests.tiny_run import write_run_config

QUIET = ["--trainer.logger", "false", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]


# ---- the usable context ---------------------------------------------------------------------------
def test_usable_context_prefers_the_trained_length_then_the_declared_one() -> None:
    gpt = GPT2Config(n_positions=256)
    assert usable_context(gpt) == (256, "the config's n_positions=256")
    setattr(gpt, TRAINED_CONTEXT_KEY, 128)
    assert usable_context(gpt)[0] == 128 and position_limit(gpt) == 256
    t5 = T5Config()
    assert position_limit(t5) is None and usable_context(t5)[0] == 1024  # relative positions: no table
    t5.n_positions = 512  # what the hub's t5-small config declares
    assert usable_context(t5)[0] == 512 and position_limit(t5) is None

    class Tok:
        model_max_length = 100

    assert usable_context(GPT2Config(n_positions=256), Tok())[0] == 100


@pytest.fixture(scope="module")
def pretrained_gpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT pretrained on 32-token blocks although it has 64 positions (as gpt-tiny once had)."""
    root = tmp_path_factory.mktemp("gpt32")
    config = write_run_config(root, max_steps=4, val_every=4)
    cli = pretrain_cli(["fit", "--config", str(config), "--trainer.logger", "false"])
    assert cli.model.model.config.n_positions == 64 and cli.datamodule.block_size == 32
    return root / "run"


def test_pretraining_records_its_context_in_checkpoint_and_export(pretrained_gpt: Path, tmp_path: Path) -> None:
    from common.export import export_checkpoint

    out = export_checkpoint(str(pretrained_gpt), str(tmp_path / "hf"))
    config = json.loads((out / "config.json").read_text())
    assert config[TRAINED_CONTEXT_KEY] == 32 and config["n_positions"] == 64
    assert getattr(AutoConfig.from_pretrained(out), TRAINED_CONTEXT_KEY) == 32


def test_evaluate_never_builds_a_prompt_past_the_trained_context(pretrained_gpt: Path, data_root: Path,
                                                                 tmp_path: Path, shared_splits) -> None:
    # Any translation task will do: Multi30k's 29k training pairs (the demonstration pool and the
    # overlap report read them all) load ~5x faster than Tatoeba's 162k.
    cli = finetune_cli(["evaluate", "--model.init", str(pretrained_gpt), "--data.task", "multi30k_en_fr",
                        "--data.shots", "5", "--data.max_eval_examples", "12", "--model.max_new_tokens", "6",
                        "--trainer.default_root_dir", str(tmp_path), *QUIET])
    results = cli.results
    assert results["max_length"] == results["usable_context"] == 32
    tokenizer = cli.model.tokenizer
    prompts = [json.loads(line) for line in (tmp_path / "eval" / "multi30k_en_fr-test-5shot"
                                              / "prompts-test.jsonl").read_text().splitlines()]
    assert len(prompts) == 12
    assert any(prompt["n_shots"] < 5 for prompt in prompts), "the 32-token context never bound: a weak check"
    for prompt in prompts:  # re-tokenized independently: prompt + generated tokens fit the 32 trained positions
        assert len(tokenizer(prompt["text"])["input_ids"]) + 6 <= 32


def test_a_longer_max_length_is_warned_about_and_past_the_table_refused(pretrained_gpt: Path, data_root: Path,
                                                                       tmp_path: Path, shared_splits,
                                                                       capsys: pytest.CaptureFixture) -> None:
    args = ["evaluate", "--model.init", str(pretrained_gpt), "--data.task", "multi30k_en_fr", "--data.max_eval_examples",
            "2", "--model.max_new_tokens", "4", "--trainer.default_root_dir", str(tmp_path), *QUIET]
    with pytest.warns(UserWarning, match="exceeds the model's usable context of 32 tokens"):
        cli = finetune_cli([*args, "--data.max_length", "48"])
    assert cli.results["max_length"] == 48
    with pytest.raises(SystemExit):
        report_user_errors(lambda: finetune_cli([*args, "--data.max_length", "65"]))
    assert "exceeds the model's 64 learned positions" in capsys.readouterr().err


# ---- one truncation rule ----------------------------------------------------------------------------
def count_words(text: str) -> int:
    return len(text.split())


QA = {"context": " ".join(f"w{i}" for i in range(100)), "question": "which?", "target": "w80 w81"}


def render_qa(item: dict) -> str:
    return f"Context: {item['context']}\nQuestion: {item['question']}\nAnswer:"


def test_training_on_extractive_qa_keeps_the_window_around_the_answer() -> None:
    span = answer_span(QA["context"], QA["target"])
    fitted = fit_long_field(render_qa, QA, count_words, 14, "context", answer=span)
    assert fitted.truncated and fitted.answer_kept and fitted.n_tokens <= 14
    assert "w80 w81" in fitted.text and fitted.text.startswith("Context: ") and fitted.text.endswith("Answer:")
    kept = fitted.text.split("\n")[0].split()[1:]
    assert len(kept) == 14 - 4 and kept == [f"w{i}" for i in range(76, 86)]  # centred on the answer
    # Without an answer (evaluation) the same rule keeps the beginning: the same end of the field.
    prefix = fit_long_field(render_qa, QA, count_words, 14, "context")
    assert prefix.text.split("\n")[0].split()[1:] == [f"w{i}" for i in range(10)] and prefix.answer_kept is None
    # An answer too long for the budget: the beginning is kept, and that is reported.
    lost = fit_long_field(render_qa, {**QA, "target": QA["context"]}, count_words, 14, "context",
                          answer=(0, len(QA["context"])))
    assert lost.answer_kept is False and lost.n_tokens <= 14


def test_squad_training_prompts_keep_their_gold_answer(data_root: Path) -> None:
    """Defect 2: at 256 tokens, 65 of 400 cut SQuAD training sequences had lost the gold answer."""
    from finetune.train_examples import TrainExamples

    task = load_task("squad")
    tokenizer = AutoTokenizer.from_pretrained(data_root / "tokenizers" / "gpt2")
    tokenizer.pad_token = tokenizer.eos_token
    rows = list(load_split(task, "validation", 120, seed=0))
    template = task.template("decoder")
    examples = TrainExamples(rows, task, template, tokenizer, "decoder", 160, 32)
    stats = examples.stats  # counted before any row is fitted
    assert stats.n_truncated > 30 and stats.n_answer_lost == 0 and stats.n_answer_kept == stats.n_truncated
    assert examples._fitted == {}
    for row, example in zip(rows, examples):
        text = tokenizer.decode(example["prompt_ids"])
        assert len(example["prompt_ids"]) + len(example["completion_ids"]) <= 160
        assert row["target"] in text and text.startswith("Context: ") and f"Question: {row['question']}" in text


# ---- which items, which demonstrations ----------------------------------------------------------------
def test_evaluate_scores_the_whole_split_by_default_and_says_n_of_n(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.tiny_hf import save_tiny_model

    fixtures = Path(__file__).parent / "fixtures" / "tasks"
    monkeypatch.setenv("LMTRAIN_DATA_ROOT", str(fixtures))
    model = save_tiny_model("gpt2", tmp_path / "gpt2")
    base = ["evaluate", "--model.init", str(model), "--data.task", str(fixtures / "capitals.yaml"),
            "--model.max_new_tokens", "2", *QUIET]
    whole = finetune_cli([*base, "--trainer.default_root_dir", str(tmp_path / "a")]).results
    n_rows = len(load_split(load_task(fixtures / "capitals.yaml"), "test"))
    assert whole["n_prompts"] == whole["n_total"] == n_rows and not whole["subset"]
    part = finetune_cli([*base, "--data.max_eval_examples", "2", "--trainer.default_root_dir", str(tmp_path / "b")])
    assert (part.results["n_prompts"], part.results["subset"]) == (2, True)
    table = (tmp_path / "b" / "eval" / "capitals-test-0shot" / "results.md").read_text()
    assert f"| 2 of {n_rows} |" in table and "[95% CI]" in table


def test_normalised_duplicates_are_never_demonstrations_and_are_reported() -> None:
    assert normalize_text("Hello,  World!\n") == normalize_text("hello world") == normalize_text("HELLO-WORLD")
    assert normalize_text("été") != normalize_text("ete")  # letters are letters: accents are kept
    task = task_from_dict({"name": "t", "type": "translation", "splits": {"train": {"local": "x"}, "test": {"local": "y"}},
                           "columns": {"source": "s", "target": "t"},
                           "templates": {"decoder": {"prompt": "{{ source }} =>"}}})
    train = [{"id": f"train_{i}", "source": f"Sentence number {i}.", "target": f"t{i}", "references": [f"t{i}"]}
             for i in range(6)]
    test = [{"id": "test_0", "source": "sentence   NUMBER 3", "target": "x", "references": ["x"]},
            {"id": "test_1", "source": "something else", "target": "y", "references": ["y"]}]
    import datasets

    builder = EvalItemBuilder(task, task.template("decoder"), count_words, 1000, 0, shots=5, seed=0,
                              train_split="train")
    builder._splits = {"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)}
    items, info = builder.build("test", None)
    assert "Sentence number 3." not in items[0]["text"] and items[0]["n_shots"] == 5  # the other five
    assert items[1]["n_shots"] == 5 and "Sentence number 3." in items[1]["text"]
    assert info["n_total"] == 2
    assert info["overlap"] == {"train": {"split": "train", "n": 1, "of": 2, "pairs": [["test_0", "train_3"]]}}
    assert leakage_key(test[0]) == leakage_key(train[3])


def test_dialogsum_near_duplicates_are_found(data_root: Path) -> None:
    """Defect 4: DialogSum test_156 equals train_7330 up to whitespace/case; dev has 51+ such dialogues."""
    task = load_task("dialogsum")
    builder = EvalItemBuilder(task, task.template("decoder"), count_words, 10**6, 0, shots=0, seed=0,
                              train_split="train")
    _, test = builder.build("test", None)
    assert ["test_156", "train_7330"] in test["overlap"]["train"]["pairs"]
    _, dev = builder.build("validation", None)
    assert dev["overlap"]["train"]["n"] >= 51 and dev["n_total"] == 500
