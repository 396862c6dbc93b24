"""`python -m finetune harness` and the shared lm-eval machinery (common/lm_harness.py) on tiny models:
both shipped task YAMLs on a causal and a seq2seq model, the scores checked against the model itself,
results written like `finetune evaluate`'s, bad input in one line, and BLEU/chrF equal to lm-eval's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from common.lm_harness import load_task_yaml, resolve_tasks, run_harness, task_scores, wrap_model
from common.user_errors import report_user_errors
from finetune.harness import main as harness_main
from finetune.metrics import compute_metrics
from finetune.pretrained import load_pretrained
from tests.tiny_hf import save_tiny_model

SHIPPED = ["tatoeba_en_fr_mc", "multi30k_en_bpb"]
N = 6  # items per task: seconds on the tiny models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    torch.manual_seed(0)  # fixed random weights: the generation test needs outputs that share characters with the references
    return {kind: save_tiny_model(kind, root / kind) for kind in ("gpt2", "t5")}


def _harness(model: Path, run_dir: Path, *extra: str, tasks: str = ",".join(SHIPPED)) -> dict:
    return harness_main(["--model.init", str(model), "--tasks", tasks, "--limit", str(N), "--run_dir", str(run_dir),
                         "--wandb", "offline", *extra])


def _samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_harness_runs_both_shipped_tasks_and_writes_results(kind: str, tiny: dict[str, Path], tmp_path: Path,
                                                            data_root: Path) -> None:
    written = _harness(tiny[kind], tmp_path / "run")
    assert sorted(written) == sorted(SHIPPED)
    for task, summary in written.items():
        out = tmp_path / "run" / "eval" / f"harness-{task}-0shot"  # beside finetune evaluate's eval/<task>-<split>-<k>shot
        assert json.loads((out / "results.json").read_text()) == summary
        assert summary["n_items"] == N and summary["kind"] == ("decoder" if kind == "gpt2" else "encoder_decoder")
        assert task in (out / "results.md").read_text() and (out / "config.yaml").is_file()
        assert len(_samples(out)) == N
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "scores and samples go to a W&B run"

    # The aggregates are what the per-item log-likelihoods say: multiple choice picks the most likely
    # candidate, bits per byte is -sum(ll) / ln 2 / sum(bytes).
    mc = written["tatoeba_en_fr_mc"]
    samples = _samples(tmp_path / "run" / "eval" / "harness-tatoeba_en_fr_mc-0shot")
    picked = [max(range(4), key=lambda i: s["filtered_resps"][i][0]) for s in samples]
    assert mc["n_total"] == 2000 and mc["metrics"]["acc"] == pytest.approx(
        sum(p == s["target"] for p, s in zip(picked, samples)) / N)
    bpb = written["multi30k_en_bpb"]
    samples = _samples(tmp_path / "run" / "eval" / "harness-multi30k_en_bpb-0shot")
    nll = -sum(s["filtered_resps"][0] for s in samples)
    n_bytes = sum(len(s["doc"]["text"].encode("utf-8")) for s in samples)
    assert bpb["n_total"] == 1000 and bpb["metrics"]["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes)


def test_harness_scores_are_the_loaded_models_own(tiny: dict[str, Path], data_root: Path) -> None:
    """In process, no export: the harness's log-likelihood of a caption is the one our model instance
    gives it (EOS as the rolling window's prefix token, the whole caption scored)."""
    loaded = load_pretrained(str(tiny["gpt2"]))
    selection = resolve_tasks(["multi30k_en_bpb"])
    results = run_harness(wrap_model(loaded.model, loaded.tokenizer, loaded.kind), selection.load(), limit=2,
                          log_samples=True)
    sample = results["samples"]["multi30k_en_bpb"][0]
    tok = loaded.tokenizer
    ids = torch.tensor([[tok.bos_token_id] + tok.encode(sample["doc"]["text"])])
    with torch.no_grad():
        logp = torch.log_softmax(loaded.model(ids).logits.float(), dim=-1)
    expected = logp[0, :-1].gather(-1, ids[0, 1:, None]).sum().item()
    assert sample["filtered_resps"][0] == pytest.approx(expected, abs=1e-3)


def test_harness_takes_our_pretraining_run_directory(tmp_path: Path, data_root: Path) -> None:
    from pretrain.cli import main as pretrain_cli
    from tests.tiny_run import write_run_config

    config = write_run_config(tmp_path, max_steps=2, val_every=2)
    pretrain_cli(["fit", "--config", str(config), "--trainer.logger", "false"])
    written = _harness(tmp_path / "run", tmp_path / "eval-run", "--wandb", "disabled", tasks="multi30k_en_bpb")
    summary = written["multi30k_en_bpb"]
    # The context is the length the checkpoint trained on (block 32), not its position table (64).
    assert summary["max_length"] == 32 and "trained_context_length" in summary["context_source"]
    assert summary["metrics"]["bits_per_byte"] > 0


def _one_error_line(run, capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exit_info:
        report_user_errors(run)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    return line


def test_unknown_task_is_one_line_with_close_matches(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     data_root: Path) -> None:
    # Checked before the model loads: the model path does not even exist.
    line = _one_error_line(lambda: _harness(tmp_path / "no-model", tmp_path, tasks="tatoeba_en_fr_mcq"), capsys)
    assert "unknown task 'tatoeba_en_fr_mcq'" in line and "close matches: tatoeba_en_fr_mc" in line


def test_hub_task_while_offline_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # conftest sets it too: the suite never reaches the hub
    line = _one_error_line(lambda: _harness(tmp_path / "no-model", tmp_path, tasks="hellaswag"), capsys)
    assert "task 'hellaswag' reads the hub dataset 'Rowan/hellaswag'" in line and "switched off" in line


def test_missing_task_file_and_data_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    line = _one_error_line(lambda: _harness(tmp_path / "no-model", tmp_path, tasks=str(tmp_path / "nope.yaml")), capsys)
    assert "nope.yaml" in line and "does not exist" in line
    task = tmp_path / "mine.yaml"
    task.write_text("task: mine\ndataset_path: text\ndataset_kwargs: {data_files: {test: gone/file.txt}}\n"
                    "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n")
    monkeypatch.setenv("LMTRAIN_DATA_ROOT", str(tmp_path / "root"))
    line = _one_error_line(lambda: _harness(tmp_path / "no-model", tmp_path, tasks=str(task)), capsys)
    assert "dataset_kwargs.data_files 'gone/file.txt'" in line and str(tmp_path / "root") in line


def test_relative_data_files_resolve_under_the_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    (root / "texts").mkdir(parents=True)
    (root / "texts" / "a.txt").write_text("one\ntwo\n")
    task = tmp_path / "mine.yaml"
    task.write_text("task: mine\ndataset_path: text\ndataset_kwargs: {data_files: {test: texts/a.txt}}\n")
    monkeypatch.setenv("LMTRAIN_DATA_ROOT", str(root))
    monkeypatch.chdir(tmp_path)  # not where the file is: the data root is what counts
    assert load_task_yaml(task)["dataset_kwargs"]["data_files"] == {"test": [str((root / "texts" / "a.txt").resolve())]}


def test_a_model_or_tokenizer_the_harness_cannot_wrap_is_one_line(tiny: dict[str, Path], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  data_root: Path) -> None:
    import finetune.pretrained
    from tokenizers import Tokenizer

    loaded = load_pretrained(str(tiny["gpt2"]))
    with pytest.raises(ValueError, match="cannot wrap .* model kind 'rnn'"):
        wrap_model(loaded.model, loaded.tokenizer, "rnn")
    raw = Tokenizer.from_file(str(tiny["gpt2"] / "tokenizer.json"))  # a `tokenizers` object, not a transformers tokenizer
    monkeypatch.setattr(finetune.pretrained, "load_pretrained",
                        lambda init: finetune.pretrained.Pretrained(loaded.model, raw, "decoder", init))
    line = _one_error_line(lambda: _harness(tiny["gpt2"], tmp_path, tasks="multi30k_en_bpb"), capsys)
    assert "cannot wrap GPT2LMHeadModel with Tokenizer" in line and "Hugging Face tokenizer" in line


def test_multiple_choice_candidates_are_fixed_and_fair(data_root: Path) -> None:
    docs = resolve_tasks(["tatoeba_en_fr_mc"]).load()["tasks"]["tatoeba_en_fr_mc"].eval_docs
    again = resolve_tasks(["configs/harness/tatoeba_en_fr_mc.yaml"]).load()["tasks"]["tatoeba_en_fr_mc"].eval_docs
    assert docs["choices"] == again["choices"]  # by name or by path, any run: the same items
    golds = [d["gold"] for d in docs]
    assert {golds.count(g) for g in range(4)} and min(golds.count(g) for g in range(4)) > len(docs) // 5
    for d in docs:
        assert d["choices"][d["gold"]] == d["fr"] and len(set(d["choices"])) == 4
    # Length-matched: the right answer is the shortest candidate about as often as chance (1 in 4), not
    # nearly always (as with candidates drawn from anywhere in this length-sorted split).
    shortest = sum(min(range(4), key=lambda i: len(d["choices"][i])) == d["gold"] for d in docs) / len(docs)
    assert 0.15 < shortest < 0.4, shortest


def test_bleu_and_chrf_equal_lm_evals_on_the_same_outputs(data_root: Path) -> None:
    """Our metrics (finetune/metrics.py) and lm-eval's bleu/chrf aggregations, on the same sentences."""
    from lm_eval.api.metrics import bleu, chrf

    refs = ["Je suis juste.", "J'ai la peau claire.", "Avertis Tom.", "Nous avons battu trois équipes.",
            "Je veux vous regarder danser."]
    preds = ["Je suis juste.", "J'ai la peau blanche.", "Préviens Tom !", "Nous avons battu les équipes.", "Je danse."]
    ours = compute_metrics("bleu_chrf", preds, [[r] for r in refs], lang="fr")
    items = list(zip(refs, preds))
    assert ours["bleu"] > 10 and ours["chrf"] > 10
    assert ours["bleu"] == bleu(items) and ours["chrf"] == chrf(items)


def test_bleu_and_chrf_equal_lm_evals_on_harness_generations(tiny: dict[str, Path], tmp_path: Path,
                                                            data_root: Path) -> None:
    """A generate_until task through the harness: our metrics on its logged generations equal its scores.
    Sampled (lm-eval seeds torch), because the random model's greedy output is one repeated
    punctuation mark, which shares no character with any reference (chrF 0 both ways proves little)."""
    task = tmp_path / "tatoeba_gen.yaml"
    task.write_text(
        "task: tatoeba_gen\ndataset_path: csv\n"
        "dataset_kwargs: {data_files: {test: translation/tatoeba_en_fr/test.tsv}, delimiter: \"\\t\", "
        "column_names: [en, fr], quoting: 3, keep_default_na: false}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: \"English: {{en}}\\nFrench:\"\n"
        "doc_to_target: \"{{fr}}\"\ngeneration_kwargs: {until: [\"\\n\"], max_gen_toks: 12, do_sample: true, temperature: 1.0}\n"
        "metric_list: [{metric: bleu, aggregation: bleu, higher_is_better: true}, "
        "{metric: chrf, aggregation: chrf, higher_is_better: true}]\n", encoding="utf-8")
    loaded = load_pretrained(str(tiny["gpt2"]))
    results = run_harness(wrap_model(loaded.model, loaded.tokenizer, loaded.kind), resolve_tasks([str(task)]).load(),
                          limit=8, log_samples=True)
    samples = results["samples"]["tatoeba_gen"]
    predictions = [s["filtered_resps"][0] for s in samples]
    assert any(p.strip() for p in predictions), predictions
    ours = compute_metrics("bleu_chrf", predictions, [[s["target"]] for s in samples], lang="fr")
    scores = task_scores(results)["tatoeba_gen"]
    assert ours["chrf"] > 0, predictions
    assert (ours["bleu"], ours["chrf"]) == (scores["bleu"], scores["chrf"])
