"""`python -m finetune` end to end on tiny random Hugging Face models saved like hub checkpoints
(GPT-2, T5, BART, Marian), used exactly as `gpt2`, `t5-small`, `bart-base` or `opus-mt` would be:
evaluate on every shipped task for both model kinds, fine-tune, resume, export, label masking,
truncation counts and bad input."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from common.user_errors import report_user_errors
from finetune.cli import main as finetune_cli
from finetune.data import IGNORE_INDEX, FinetuneDataModule
from finetune.tasks import TASKS_DIR, load_task
from tests.tiny_hf import save_tiny_model

SHIPPED_TASKS = sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def _evaluate_cases() -> list:
    """(task, family) for every shipped task and both model families. In the default suite each task
    runs with one family, alternating within each task type so that both families evaluate every type
    (a type with one task runs both); the other pairs run under `-m slow`. What a pair adds over its
    task's other family is that task's template of that model kind, which
    tests/test_tasks.py::test_shipped_templates_render_real_rows_for_both_model_kinds renders on real
    rows, demonstrations included."""
    by_type: dict[str, list[str]] = defaultdict(list)
    for task in SHIPPED_TASKS:
        by_type[load_task(task).type].append(task)
    cases = []
    for task in SHIPPED_TASKS:
        tasks_of_type = by_type[load_task(task).type]
        for j, family in enumerate(("gpt2", "t5")):
            default = len(tasks_of_type) == 1 or tasks_of_type.index(task) % 2 == j
            cases.append(pytest.param(task, family, marks=() if default else pytest.mark.slow, id=f"{task}-{family}"))
    return cases


QUIET = ["--trainer.logger", "false", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_hf")
    return {kind: save_tiny_model(kind, root / kind) for kind in ("gpt2", "t5", "bart", "marian")}


def _evaluate(model: Path | str, task: str, run_dir: Path, *extra: str, shots: int = 1, n: int = 4):
    return finetune_cli(["evaluate", "--model.init", str(model), "--data.task", task, "--data.shots", str(shots),
                         "--data.max_eval_examples", str(n), "--data.eval_batch_size", "4",
                         "--model.max_new_tokens", "4", "--trainer.default_root_dir", str(run_dir), *QUIET, *extra])


@pytest.mark.integration  # a sweep of CLI runs over the real tasks; the quick tier evaluates in the tests below
@pytest.mark.parametrize(("task", "family"), _evaluate_cases())
def test_evaluate_every_shipped_task(task: str, family: str, tiny: dict[str, Path], data_root: Path,
                                     tmp_path: Path, shared_splits) -> None:
    cli = _evaluate(tiny[family], task, tmp_path)
    results = cli.results
    out = tmp_path / "eval" / f"{task}-{results['split']}-1shot"
    saved = json.loads((out / "results.json").read_text())
    assert saved["n_prompts"] == 4 and saved["kind"] == ("decoder" if family == "gpt2" else "encoder_decoder")
    assert saved["score_name"] in saved["metrics"] and saved["score"] == saved["metrics"][saved["score_name"]]
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    prompts = [json.loads(line) for line in (out / f"prompts-{results['split']}.jsonl").read_text().splitlines()]
    assert len(predictions) == len(prompts) == 4
    assert [p["id"] for p in predictions] == [p["id"] for p in prompts]
    for prompt in prompts:  # the demonstration is whole and is not the evaluated item
        assert prompt["n_shots"] <= 1
        if prompt["n_shots"] == 1:
            demo, _, query = prompt["text"].rpartition(cli.datamodule.template.demo_separator)
            assert demo and query and demo != query
    assert "|" in (out / "results.md").read_text()


@pytest.mark.parametrize("kind", ["gpt2", "t5", "bart", "marian"])
def test_fine_tune_released_checkpoint_then_evaluate_and_export(kind: str, tiny: dict[str, Path],
                                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMTRAIN_DATA_ROOT", str(Path(__file__).parent / "fixtures" / "tasks"))
    task = str(Path(__file__).parent / "fixtures" / "tasks" / "capitals.yaml")
    run = tmp_path / "run"
    fit = finetune_cli(["fit", "--model.init", str(tiny[kind]), "--data.task", task, "--data.val_split", "test",
                        "--data.batch_size", "2",
                        "--data.max_val_examples", "3", "--model.max_new_tokens", "4", "--model.lr", "1e-3",
                        "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1",
                        "--attention_plots.n_examples", "0",  # heatmaps: tests/test_attention_plots.py
                        "--trainer.default_root_dir", str(run), *QUIET])
    assert fit.trainer.global_step == 4
    assert {"train/loss", "val/score"} <= fit.trainer.callback_metrics.keys()
    assert fit.trainer.callback_metrics["train/grad_norm"] > 0
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(n.startswith("step0000004-score") for n in ckpts), ckpts

    # The fine-tuned checkpoint is a valid --model.init, and exports to an HF directory. Evaluated
    # in the training run's directory, it leaves the run's config.yaml alone and records its own.
    fit_config = (run / "config.yaml").read_bytes()
    again = _evaluate(run / "checkpoints" / "last.ckpt", task, run, shots=0, n=3)
    assert again.results["n_prompts"] == 3
    assert (run / "config.yaml").read_bytes() == fit_config and not list(run.glob("config-*.yaml"))
    assert "shots: 0" in (run / "eval" / f"capitals-{again.results['split']}-0shot" / "config.yaml").read_text()
    from common.export import export_checkpoint

    out = export_checkpoint(str(run / "checkpoints" / "last.ckpt"), str(tmp_path / "hf"))
    auto = AutoModelForCausalLM if kind == "gpt2" else AutoModelForSeq2SeqLM
    exported = auto.from_pretrained(out).eval()
    live = fit.model.model.eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    kwargs = {} if kind == "gpt2" else {"decoder_input_ids": ids}
    assert torch.equal(exported(input_ids=ids, **kwargs).logits, live(input_ids=ids, **kwargs).logits)
    assert AutoTokenizer.from_pretrained(out)("Paris")["input_ids"] == fit.model.tokenizer("Paris")["input_ids"]


def _train_batch(tiny_dir: Path, kind: str, rows: list[dict], task: str = "tatoeba_en_fr", max_length: int = 128,
                 max_target_length: int = 128):
    """(data module, tokenizer, batch) for ``rows`` through the training path: fit, tokenize, collate."""
    from finetune.pretrained import load_pretrained
    from finetune.train_examples import TrainExamples

    loaded = load_pretrained(str(tiny_dir))
    data = FinetuneDataModule(task)
    data.tokenizer, data.kind, data.max_length = loaded.tokenizer, loaded.kind, max_length
    data.template = data.task.template(loaded.kind)
    rows = [{"id": str(i), "references": [r["target"]], **r} for i, r in enumerate(rows)]
    examples = TrainExamples(rows, data.task, data.template, loaded.tokenizer, loaded.kind, max_length,
                             max_target_length)
    return data, loaded.tokenizer, data.collate_train([examples[i] for i in range(len(rows))]), examples.stats


def test_decoder_labels_cover_only_the_completion_and_eos(tiny: dict[str, Path]) -> None:
    row = {"source": "I am happy.", "target": "Je suis content."}
    data, tok, batch, _ = _train_batch(tiny["gpt2"], "gpt2", [row, {"source": "Hi.", "target": "Salut."}])
    prompt, completion = data.template.render_prompt(row), data.template.render_completion(row)
    n_prompt = len(tok(prompt)["input_ids"])
    expected = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    labels = batch["labels"][0]
    assert (labels[:n_prompt] == IGNORE_INDEX).all()
    assert labels[n_prompt : n_prompt + len(expected)].tolist() == expected
    assert (labels[n_prompt + len(expected):] == IGNORE_INDEX).all()  # padding of the longer row's batch
    assert batch["input_ids"][0, : n_prompt + len(expected)].tolist() == tok(prompt)["input_ids"] + expected
    assert batch["attention_mask"].sum(1).tolist()[0] == n_prompt + len(expected)


def test_seq2seq_labels_are_the_target_with_padding_ignored(tiny: dict[str, Path]) -> None:
    rows = [{"source": "a", "target": "Je suis content."}, {"source": "b", "target": "Oui."}]
    _, tok, batch, _ = _train_batch(tiny["t5"], "t5", rows)
    eos = [tok.eos_token_id]  # this byte-level BPE adds no EOS itself; the labels must end with one
    assert tok(text_target="Oui.")["input_ids"][-1] != tok.eos_token_id
    assert batch["labels"][0].tolist() == tok(text_target="Je suis content.")["input_ids"] + eos
    short = tok(text_target="Oui.")["input_ids"] + eos
    assert batch["labels"][1, : len(short)].tolist() == short
    assert (batch["labels"][1, len(short):] == IGNORE_INDEX).all()


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_label_smoothing_scores_the_same_targets_as_the_model_loss(kind: str, tiny: dict[str, Path]) -> None:
    """Smoothing recomputes the loss from the logits: the targets must line up with the model's own
    (decoder: shifted by one), so a vanishing smoothing gives the model's loss, and 0.1 changes it."""
    from finetune.system import FinetuneSystem

    rows = [{"source": "I am happy.", "target": "Je suis content."}, {"source": "Hi.", "target": "Salut."}]
    _, _, batch, _ = _train_batch(tiny[kind], kind, rows)
    losses = {}
    for smoothing in (0.0, 1e-7, 0.1):
        system = FinetuneSystem(init=str(tiny[kind]), label_smoothing=smoothing)
        system.log_train_loss = lambda loss: None  # no trainer attached
        losses[smoothing] = float(system.training_step(batch, 0))
    assert losses[1e-7] == pytest.approx(losses[0.0], abs=1e-4)
    assert losses[0.1] != pytest.approx(losses[0.0], abs=1e-5)  # (a random model is near-uniform: a small change)
    with pytest.raises(ValueError, match="label_smoothing"):
        FinetuneSystem(init=str(tiny[kind]), label_smoothing=1.0)


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_training_sequences_never_exceed_max_length(kind: str, tiny: dict[str, Path]) -> None:
    """Issue 10, defect 7: a completion as long as max_length used to keep the whole prompt too."""
    long_target = " ".join(["Paris"] * 80)
    rows = [{"source": "I am happy.", "target": long_target},
            {"source": " ".join(["word"] * 200), "target": "Oui."}]
    data, tok, batch, stats = _train_batch(tiny[kind], kind, rows, max_length=24, max_target_length=64)
    width = batch["input_ids"].shape[1]
    assert width <= 24 and batch["labels"].shape[1] <= 64
    assert stats.n_target_cut == 1 and stats.n_truncated >= 1
    if kind == "gpt2":
        assert (batch["labels"][:, -1][batch["attention_mask"][:, -1] == 1] == tok.eos_token_id).all()
        prompt = tok.decode(batch["input_ids"][0][batch["labels"][0] == IGNORE_INDEX])
        assert prompt.startswith("English:") and prompt.endswith("French:")  # the template stays whole


def test_prompts_longer_than_the_context_are_truncated_and_counted(tiny: dict[str, Path], data_root: Path,
                                                                   tmp_path: Path, shared_splits) -> None:
    cli = _evaluate(tiny["gpt2"], "dialogsum", tmp_path, "--data.max_length", "96", shots=2, n=4)
    results = cli.results
    assert results["n_truncated"] == 4  # dialogues are longer than 96 - 4 tokens even alone
    assert results["shots_used_mean"] == 0.0 and results["shots_requested"] == 2
    for item in cli.datamodule.eval_items["test"]:
        assert item["n_tokens"] <= 96 - 4


def test_more_shots_than_fit_are_reported_with_the_reason(tiny: dict[str, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12, defect 6f: --data.shots 1000 silently used a handful: the log and the results say how many fit, why."""
    monkeypatch.setenv("LMTRAIN_DATA_ROOT", str(Path(__file__).parent / "fixtures" / "tasks"))
    task = str(Path(__file__).parent / "fixtures" / "tasks" / "capitals.yaml")
    with pytest.warns(UserWarning, match=r"data.shots=1000 requested, 4-4 used .*3 of 3 items had fewer than 1000 "
                                         r"demonstrations to draw: the pool split 'train' has 5 rows"):
        results = _evaluate(tiny["gpt2"], task, tmp_path / "pool", shots=1000).results
    assert results["shots_requested"] == 1000 and results["shots_used_max"] == 4  # the 5 rows minus the item
    assert results["shots_limited_by"] == {"pool": 3, "context": 0}
    saved = json.loads((tmp_path / "pool" / "eval" / "capitals-test-1000shot" / "results.json").read_text())
    assert saved["shots_note"] == results["shots_note"]
    assert "- shots: data.shots=1000 requested" in (tmp_path / "pool" / "eval" / "capitals-test-1000shot"
                                                     / "results.md").read_text()

    with pytest.warns(UserWarning, match=r"3 of 3 prompts fit no more whole demonstrations in data.max_length=100 "
                                         r"tokens \(4 of them kept for the answer\)"):
        results = _evaluate(tiny["gpt2"], task, tmp_path / "context", "--data.max_length", "100", shots=3).results
    assert results["shots_limited_by"] == {"pool": 0, "context": 3} and 0 < results["shots_used_max"] < 3


@pytest.mark.parametrize("batching", [("--data.batch_size", "1"), ("--data.batch_tokens", "24"),
                                      ("--data.packing", "true", "--data.batch_size", "1", "--data.max_length", "40")],
                         ids=["sentences", "tokens", "packed"])
def test_interrupted_fine_tuning_resumes_exactly(tiny: dict[str, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch, batching: tuple[str, str]) -> None:
    """Interrupted after step 2 and resumed with --ckpt_path last, a run ends with the weights of an
    uninterrupted one (same data order mid-epoch, same dropout RNG) and continues its W&B run; with
    batches of sentences, with token-based batches and with packed rows."""
    monkeypatch.setenv("LMTRAIN_DATA_ROOT", str(Path(__file__).parent / "fixtures" / "tasks"))
    task = str(Path(__file__).parent / "fixtures" / "tasks" / "capitals.yaml")

    def fit(run: Path, *extra: str):
        return finetune_cli(["fit", "--model.init", str(tiny["gpt2"]), "--data.task", task, "--data.val_split", "test",
                             *batching, "--data.max_val_examples", "2", "--model.max_new_tokens", "2",
                             "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
                             "--trainer.default_root_dir", str(run), "--trainer.accelerator", "cpu",
                             "--trainer.enable_progress_bar", "false", *extra])

    straight = fit(tmp_path / "straight").model.model.state_dict()
    stop = tmp_path / "stop.yaml"
    stop.write_text("trainer:\n  callbacks:\n    - class_path: tests.tiny_run.InterruptAtStep\n"
                    "      init_args: {step: 2}\n")
    with pytest.raises(SystemExit):  # Lightning shuts down gracefully on Ctrl-C, then exits 1
        fit(tmp_path / "resumed", "--config", str(stop))
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    resumed = fit(tmp_path / "resumed", "--ckpt_path", "last")
    assert resumed.trainer.global_step == 4
    weights = resumed.model.model.state_dict()
    assert [k for k in straight if not torch.equal(straight[k], weights[k])] == []
    # The id from each run's transaction log: two starts in the same second get a "-1" directory suffix.
    logs = (tmp_path / "resumed" / "wandb").glob("offline-run-*/run-*.wandb")
    ids = {p.name[len("run-"):-len(".wandb")] for p in logs}
    assert len(ids) == 1, ids


def test_model_tokenizer_mismatch_is_refused(tiny: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    from tests.tiny_hf import tiny_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny["gpt2"])
    model.resize_token_embeddings(100)  # fewer rows than the tokenizer has tokens
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer(tmp_path / "m")
    with pytest.raises(SystemExit):
        report_user_errors(lambda: _evaluate(tmp_path / "m", "tatoeba_en_fr", tmp_path / "run"))
    assert "model/tokenizer mismatch" in capsys.readouterr().err


def test_pickle_only_model_folder_is_refused_with_the_conversion(tiny: dict[str, Path], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """Issue 12, defect 6d: only safetensors are loaded; a pytorch_model.bin used to end in an UnpicklingError."""
    import numpy as np

    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny["gpt2"] / name).read_bytes())
    weights = dict(AutoModelForCausalLM.from_pretrained(tiny["gpt2"]).state_dict())
    weights["extra"] = np.float64(1.0)  # any non-tensor object: weights_only unpickling refuses it
    torch.save(weights, folder / "pytorch_model.bin")
    with pytest.raises(SystemExit):
        report_user_errors(lambda: _evaluate(folder, "tatoeba_en_fr", tmp_path / "run"))
    err = capsys.readouterr().err
    assert "Traceback" not in err and "UnpicklingError" not in err, err
    assert "pytorch_model.bin" in err and "safetensors only" in err
    assert "use_safetensors=False" in err and "save_pretrained(" in err  # how to convert it
    assert sorted(p.name for p in folder.iterdir()) == sorted(["config.json", "generation_config.json", "tokenizer.json",
                                                               "tokenizer_config.json", "pytorch_model.bin"])


def test_unknown_model_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        report_user_errors(lambda: _evaluate(tmp_path / "nothing-here", "tatoeba_en_fr", tmp_path / "run"))
    assert "nothing-here" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_fit_fast_dev_run(kind: str, tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMTRAIN_DATA_ROOT", str(Path(__file__).parent / "fixtures" / "tasks"))
    task = str(Path(__file__).parent / "fixtures" / "tasks" / "capitals.yaml")
    cli = finetune_cli(["fit", "--model.init", str(tiny[kind]), "--data.task", task, "--data.val_split", "test",
                        "--data.batch_size", "2", "--model.max_new_tokens", "2", "--trainer.fast_dev_run", "2",
                        "--trainer.default_root_dir", str(tmp_path), *QUIET])
    assert cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_random_init_keeps_the_architecture_and_tokenizer_and_draws_new_weights(tiny: dict[str, Path], kind: str) -> None:
    """The no-pretraining control: same config and tokenizer as --model.init, none of its weights,
    and the same draw for the same seed (so the control is reproducible)."""
    from finetune.pretrained import load_pretrained

    pretrained = load_pretrained(str(tiny[kind]))
    torch.manual_seed(0)
    control = load_pretrained(str(tiny[kind]), random_init=True)
    torch.manual_seed(0)
    again = load_pretrained(str(tiny[kind]), random_init=True)
    assert control.model.config.to_dict() == pretrained.model.config.to_dict()
    assert control.tokenizer("Paris")["input_ids"] == pretrained.tokenizer("Paris")["input_ids"]
    ours, theirs, same = (m.model.state_dict() for m in (control, pretrained, again))
    assert ours.keys() == theirs.keys()
    assert not any(torch.equal(ours[k], theirs[k]) for k in ours if ours[k].numel() > 1 and ours[k].std() > 0)
    assert all(torch.equal(ours[k], same[k]) for k in ours)


def test_random_init_without_init_is_refused() -> None:
    from finetune.system import FinetuneSystem

    with pytest.raises(ValueError, match="model.random_init needs model.init"):
        FinetuneSystem(scratch={"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 8}, random_init=True)


def test_a_released_checkpoint_fine_tunes_in_train_mode(tiny: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """from_pretrained returns an eval-mode model and Lightning keeps module modes: dropout must be on
    in every training step (after validations too), as for a model built fresh."""
    from tests.tiny_run import TrainModeRecorder

    monkeypatch.setenv("LMTRAIN_DATA_ROOT", str(Path(__file__).parent / "fixtures" / "tasks"))
    recorder = tmp_path / "rec.yaml"
    recorder.write_text("trainer:\n  callbacks:\n    - class_path: tests.tiny_run.TrainModeRecorder\n")
    fit = finetune_cli(["fit", "--model.init", str(tiny["gpt2"]), "--data.task",
                        str(Path(__file__).parent / "fixtures" / "tasks" / "capitals.yaml"), "--data.val_split", "test",
                        "--data.batch_size", "2", "--data.max_val_examples", "2", "--model.max_new_tokens", "2",
                        "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--config", str(recorder),
                        "--trainer.default_root_dir", str(tmp_path / "run"), *QUIET])
    steps = next(cb for cb in fit.trainer.callbacks if type(cb).__name__ == "TrainModeRecorder").eval_modules
    assert len(steps) == 4 and all(names == [] for names in steps), steps
