"""Metrics equal the reference packages (sacrebleu, rouge-score, official SQuAD v1.1) exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sacrebleu
from rouge_score import rouge_scorer, tokenizers

from finetune.metrics import (
    UnicodeWordTokenizer,
    compute_metrics,
    sentence_scores,
    split_sentences,
)
from tests.fixtures import squad_v1_official as official

SQUAD_DEV = Path("/work/shared/data/qa/squad_v1.1/dev-v1.1.part-01-of-02.json")

# English -> French outputs of a middling system; 1 to 3 references per item.
TRANSLATIONS = [
    ("Le chat est assis sur le tapis.",
     ["Le chat est assis sur le tapis.", "Un chat est sur le tapis."]),
    ("Il pleut depuis ce matin.", ["Il pleut depuis ce matin."]),
    ("Je ne sais pas où il est allé.",
     ["Je ne sais pas où il est parti.", "J'ignore où il est allé.",
      "Je ne sais pas où il est allé hier."]),
    ("La réunion a été reportée à lundi.", ["La réunion est reportée à lundi."]),
    ("", ["Merci beaucoup."]),
    ("Nous avons mangé des pommes de terre.",
     ["Nous avons mangé des pommes de terre.", "On a mangé des patates."]),
    ("Le train arrive à 8 heures.", ["Le train arrive à huit heures."]),
    ("Elle parle trois langues couramment.",
     ["Elle parle couramment trois langues.", "Elle maîtrise trois langues."]),
]
SUMMARIES = [
    ("The council approved the budget on Monday. Spending on schools rises.",
     ["The city council approved the budget. School spending will rise.",
      "Budget approved by council on Monday."]),
    ("Storms hit the coast! Thousands lost power.",
     ["A storm left thousands without power on the coast."]),
    ("", ["The team won the final."]),
    ("Researchers found a new species of frog. It lives in the Andes.",
     ["A new frog species was discovered in the Andes by researchers."]),
]


def streams(references: list[list[str]]) -> list[list[str | None]]:
    """Reference streams as sacrebleu's docs prescribe for a variable number of references."""
    n = max(len(r) for r in references)
    return [[r[j] if j < len(r) else None for r in references] for j in range(n)]


def test_bleu_chrf_equal_sacrebleu_with_variable_references() -> None:
    predictions = [p for p, _ in TRANSLATIONS]
    references = [r for _, r in TRANSLATIONS]
    result = compute_metrics("bleu_chrf", predictions, references, lang="fr")
    assert result["bleu"] == sacrebleu.corpus_bleu(predictions, streams(references)).score
    assert result["chrf"] == sacrebleu.corpus_chrf(predictions, streams(references)).score
    assert result["bleu_signature"].startswith("nrefs:var|case:mixed|eff:no|tok:13a|")
    assert result["chrf_signature"].startswith("nrefs:var|")
    assert result["n_empty_predictions"] == 1 and result["n_items"] == len(TRANSLATIONS)
    assert 0 < result["bleu"] < 100 and 0 < result["chrf"] < 100


def test_bleu_chrf_single_reference_and_perfect_output() -> None:
    predictions = [p for p, _ in TRANSLATIONS]
    first_refs = [[r[0]] for _, r in TRANSLATIONS]
    result = compute_metrics("bleu_chrf", predictions, first_refs, lang="fr")
    assert result["bleu"] == sacrebleu.corpus_bleu(predictions, [[r[0] for r in first_refs]]).score
    assert result["bleu_signature"].startswith("nrefs:1|")
    perfect = compute_metrics("bleu_chrf", [r[0] for r in first_refs], first_refs)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)


def reference_rouge(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    scores = [scorer.score_multi(refs, p) for p, refs in zip(predictions, references)]
    return {t: 100 * sum(s[t].fmeasure for s in scores) / len(scores) for t in scores[0]}


def test_rouge_equals_rouge_score() -> None:
    predictions = [p for p, _ in SUMMARIES]
    references = [r for _, r in SUMMARIES]
    result = compute_metrics("rouge", predictions, references)
    split = reference_rouge(
        [split_sentences(p) for p in predictions],
        [[split_sentences(r) for r in refs] for refs in references],
    )
    raw = reference_rouge(predictions, references)
    for rouge_type in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert result[rouge_type] == split[rouge_type], rouge_type
    for rouge_type in ("rouge1", "rouge2", "rougeL"):  # sentence splitting only matters for Lsum
        assert result[rouge_type] == pytest.approx(raw[rouge_type], abs=1e-12)
    # Unsplit multi-sentence summaries are one "sentence" to rougeLsum: it equals rougeL there.
    assert raw["rougeLsum"] == pytest.approx(raw["rougeL"])
    assert result["rougeLsum"] != result["rougeL"]
    assert result["rouge_tokenizer"] == "default-porter-stemmer"
    assert result["n_empty_predictions"] == 1


def test_rouge_keeps_accents_for_non_english() -> None:
    prediction = ["L'été à Zürich était chaud."]
    reference = [["L'été à Zürich fut chaud."]]
    french = compute_metrics("rouge", prediction, reference, lang="fr")
    assert UnicodeWordTokenizer().tokenize("L'été à Zürich") == ["l", "été", "à", "zürich"]
    assert french["rouge_tokenizer"] == UnicodeWordTokenizer.name
    # 5 of 6 tokens shared (l, été, à, zürich, chaud): F1 = 5/6.
    assert french["rouge1"] == pytest.approx(100 * 5 / 6)
    scorer = rouge_scorer.RougeScorer(["rouge1"], tokenizer=UnicodeWordTokenizer())
    assert french["rouge1"] == 100 * scorer.score(reference[0][0], prediction[0])["rouge1"].fmeasure
    # The default tokenizer deletes accented letters: "été" (summer) and "ôté" (removed) both
    # become "t", so it calls them a perfect match.
    default = tokenizers.DefaultTokenizer(use_stemmer=True)
    assert default.tokenize("L'été à Zürich") == ["l", "t", "z", "rich"]
    assert compute_metrics("rouge", ["été"], [["ôté"]], lang="en")["rouge1"] == 100.0
    assert compute_metrics("rouge", ["été"], [["ôté"]], lang="fr")["rouge1"] == 0.0


def test_split_sentences() -> None:
    text = 'It rained. "Stay in!" she said. Why?\nNew line… end'
    assert split_sentences(text) == 'It rained.\n"Stay in!"\nshe said.\nWhy?\nNew line…\nend'
    assert split_sentences("  ") == ""


def test_squad_hand_checked_values() -> None:
    def squad(prediction: str, truths: list[str]) -> dict:
        return compute_metrics("squad", [prediction], [truths])

    assert squad("The cat", ["cat"])["exact_match"] == 100.0
    assert squad("the black cat sat", ["a cat sat down"])["f1"] == pytest.approx(100 * 2 / 3)
    assert squad("Paris.", ["London", "paris"])["f1"] == 100.0  # max over ground truths
    both_articles = squad("the", ["a"])  # both normalise to "": official EM 1, F1 0
    assert (both_articles["exact_match"], both_articles["f1"]) == (100.0, 0.0)
    assert squad("", ["Paris"])["n_empty_predictions"] == 1


def perturb(answer: str, question: str, i: int) -> str:
    """Realistic system outputs: exact, cased/punctuated, longer, shorter, wrong, empty."""
    words = answer.split()
    return [
        answer,
        f"The {answer.upper()}.",
        f"{answer} in the year before",
        " ".join(words[: max(1, len(words) // 2)]),
        question,
        "",
        f"  {answer.lower()}, an answer",
    ][i % 7]


@pytest.mark.skipif(not SQUAD_DEV.is_file(), reason=f"SQuAD v1.1 dev part not found at {SQUAD_DEV}")
def test_squad_equals_official_script_on_dev_data() -> None:
    data = json.loads(SQUAD_DEV.read_text())["data"]
    qas = [qa for article in data for paragraph in article["paragraphs"] for qa in paragraph["qas"]]
    answers = {
        qa["id"]: perturb(qa["answers"][0]["text"], qa["question"], i) for i, qa in enumerate(qas)
    }
    predictions = [answers[qa["id"]] for qa in qas]
    references = [[a["text"] for a in qa["answers"]] for qa in qas]

    ours = compute_metrics("squad", predictions, references)
    theirs = official.evaluate(data, answers)
    assert (ours["exact_match"], ours["f1"]) == (theirs["exact_match"], theirs["f1"])
    assert 20 < ours["exact_match"] < 80  # the perturbations really mix right and wrong
    per_item = sentence_scores("squad", predictions, references)
    expected = [100 * official.metric_max_over_ground_truths(official.f1_score, p, r)
                for p, r in zip(predictions, references)]
    assert per_item == expected


def test_sentence_scores() -> None:
    predictions = [p for p, _ in TRANSLATIONS]
    references = [r for _, r in TRANSLATIONS]
    bleu = sentence_scores("bleu_chrf", predictions, references, lang="fr")
    sentence_bleu = sacrebleu.metrics.BLEU(effective_order=True)
    pairs = zip(predictions, references)
    assert bleu == [sentence_bleu.sentence_score(p, r).score for p, r in pairs]
    assert bleu[0] == pytest.approx(100.0) and bleu[4] == 0.0
    rouge_l = sentence_scores("rouge", [p for p, _ in SUMMARIES], [r for _, r in SUMMARIES])
    assert len(rouge_l) == len(SUMMARIES) and rouge_l[2] == 0.0 and 0 < rouge_l[0] < 100


@pytest.mark.parametrize("metric", ["bleu_chrf", "rouge", "squad"])
def test_all_empty_predictions_do_not_crash(metric: str) -> None:
    result = compute_metrics(metric, ["", " "], [["a b c"], ["d", "e f"]])
    assert result["n_empty_predictions"] == 2
    assert sentence_scores(metric, ["", " "], [["a b c"], ["d", "e f"]]) == [0.0, 0.0]


def test_bad_inputs_are_value_errors() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 reference lists"):
        compute_metrics("squad", ["a", "b"], [["a"]])
    with pytest.raises(ValueError, match=r"references\[1\] must be a non-empty list"):
        compute_metrics("rouge", ["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match=r"references\[0\]"):
        sentence_scores("squad", ["a"], ["a"])  # a bare string, not a list of references
    with pytest.raises(ValueError, match="no predictions"):
        compute_metrics("bleu_chrf", [], [])
    with pytest.raises(ValueError, match="unknown metric 'meteor'"):
        compute_metrics("meteor", ["a"], [["a"]])  # type: ignore[arg-type]
