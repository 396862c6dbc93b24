"""Evaluation metrics that equal the reference implementations users compare against.

Scores come from the reference packages themselves — sacrebleu for BLEU/chrF, Google's
rouge-score for ROUGE, the official SQuAD v1.1 rules for EM/F1 — not from torchmetrics or HF
`evaluate`, which disagree with them on the same predictions (measured 2026-11-25 on Tatoeba
outputs: torchmetrics' chrF 0.186 below sacrebleu's, its multi-reference SacreBLEU 0.105 below;
HF `evaluate` ROUGE is a bootstrap estimate, up to 0.19 off the mean). All scores are on a 0-100 scale.

Rules chosen, so numbers are reproducible elsewhere:

- **Multiple references (BLEU/chrF)**: sacrebleu wants reference *streams* (stream j holds the
  j-th reference of every item). Items with fewer references are padded with ``None``, which
  sacrebleu skips for that item; the signature then says ``nrefs:var``.
- **Multiple references (ROUGE)**: per item, the reference with the highest F1 for each ROUGE
  type (rouge-score's ``score_multi``); mean over items.
- **rougeLsum** wants one sentence per line. Predictions and references are split with a small
  regex (nltk's punkt cannot be downloaded here): existing newlines are kept, and a line is also
  split after ``.``, ``!``, ``?`` or ``…`` (optionally followed by closing quotes/brackets)
  when whitespace follows. Abbreviations ("Dr. Smith") are split too; only rougeLsum is affected.
- **ROUGE tokenizer**: for ``lang="en"`` rouge-score's default (lowercase, a-z0-9 only, Porter
  stemmer on words > 3 characters). That tokenizer deletes accented letters ("été" -> "t"),
  so for any other language we use `UnicodeWordTokenizer`: lowercase, Unicode letter/digit runs,
  no stemming (Porter is English-only). ``rouge_tokenizer`` in the result names the one used.
- **SQuAD**: official v1.1 normalisation (lowercase, drop ASCII punctuation, drop the articles
  a/an/the, collapse whitespace), max over the ground truths, mean over items.

Empty predictions are scored (as the reference packages score them: 0 or near it) and counted in
``n_empty_predictions``.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import sacrebleu
from rouge_score import rouge_scorer

Metric = Literal["bleu_chrf", "rouge", "squad"]
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
# The whitespace after a sentence end, closing quotes/brackets staying with the sentence.
_SENTENCE_END = re.compile(r"([.!?…][\"'”’»)\]]*)\s+")


class UnicodeWordTokenizer:
    """rouge-score tokenizer for non-English text: lowercase runs of Unicode letters/digits.

    The default tokenizer keeps only ``[a-z0-9]``, so "été" and "ôté" both become "t" and
    "Zürich" becomes "z", "rich". Scripts written without spaces (Chinese, Japanese) yield one
    token per run of characters here; word-segment such text first if ROUGE on it matters.
    """

    name = "unicode-words-lowercase-nostem"
    _WORD = re.compile(r"[^\W_]+")

    def tokenize(self, text: str) -> list[str]:
        return self._WORD.findall(text.lower())


def split_sentences(text: str) -> str:
    """One sentence per line, for rougeLsum (rule in the module docstring)."""
    one_per_line = _SENTENCE_END.sub("\\1\n", text)
    return "\n".join(s.strip() for s in one_per_line.split("\n") if s.strip())


def compute_metrics(
    metric: Metric,
    predictions: list[str],
    references: list[list[str]],
    lang: str = "en",
) -> dict[str, Any]:
    """Corpus scores (0-100) plus the signature/config strings needed to reproduce them.

    `references[i]` lists the acceptable references of item i (at least one; counts may vary).
    `lang` is the target language: it picks sacrebleu's tokenizer (13a, zh, ja-mecab, ...) and
    the ROUGE tokenizer.
    """
    _check_inputs(predictions, references)
    result: dict[str, Any] = {
        "n_items": len(predictions),
        "n_empty_predictions": sum(1 for p in predictions if not p.strip()),
    }
    if metric == "bleu_chrf":
        result.update(_bleu_chrf(predictions, references, lang))
    elif metric == "rouge":
        result.update(_rouge(predictions, references, lang))
    elif metric == "squad":
        result.update(_squad(predictions, references))
    else:
        raise ValueError(f"unknown metric {metric!r}; choose one of bleu_chrf, rouge, squad")
    return result


def sentence_scores(
    metric: Metric,
    predictions: list[str],
    references: list[list[str]],
    lang: str = "en",
) -> list[float]:
    """One 0-100 score per item, for per-bucket analysis (e.g. by source length).

    bleu_chrf: sentence BLEU with ``effective_order=True`` (sacrebleu's recommendation for single
    sentences); rouge: ROUGE-L F1, max over references; squad: SQuAD F1, max over ground truths.
    """
    _check_inputs(predictions, references)
    if metric == "bleu_chrf":
        bleu = sacrebleu.metrics.BLEU(effective_order=True, trg_lang=lang)
        return [bleu.sentence_score(p, refs).score for p, refs in zip(predictions, references)]
    if metric == "rouge":
        scorer = _rouge_scorer(("rougeL",), lang)
        return [
            100.0 * scorer.score_multi(refs, p)["rougeL"].fmeasure
            for p, refs in zip(predictions, references)
        ]
    if metric == "squad":
        return [
            100.0 * max(squad_f1(p, r) for r in refs) for p, refs in zip(predictions, references)
        ]
    raise ValueError(f"unknown metric {metric!r}; choose one of bleu_chrf, rouge, squad")


def _check_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if not predictions:
        raise ValueError("no predictions to score (an empty evaluation split?)")
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} reference lists; "
            "they must pair up item by item"
        )
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(
                f"references[{i}] must be a non-empty list of strings, got {refs!r}"
            )


def _bleu_chrf(predictions: list[str], references: list[list[str]], lang: str) -> dict[str, Any]:
    n_streams = max(len(refs) for refs in references)
    streams = [
        [refs[j] if j < len(refs) else None for refs in references] for j in range(n_streams)
    ]
    bleu = sacrebleu.metrics.BLEU(trg_lang=lang)
    chrf = sacrebleu.metrics.CHRF()
    bleu_score = bleu.corpus_score(predictions, streams)
    chrf_score = chrf.corpus_score(predictions, streams)
    return {
        "bleu": bleu_score.score,
        "chrf": chrf_score.score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "exact_match": _mean(_translation_exact_match(predictions, references)),
    }


def _translation_exact_match(predictions: list[str], references: list[list[str]]) -> list[float]:
    """Whole-output accuracy per item: equal to a reference up to surrounding/repeated whitespace."""
    return [float(" ".join(p.split()) in {" ".join(r.split()) for r in refs})
            for p, refs in zip(predictions, references)]


def _mean(fractions: Sequence[float]) -> float:
    """0-100 mean of per-item fractions, summed first (as the official SQuAD script does)."""
    return 100.0 * sum(fractions) / max(len(fractions), 1)


def _rouge_scorer(rouge_types: Sequence[str], lang: str) -> rouge_scorer.RougeScorer:
    tokenizer = None if lang == "en" else UnicodeWordTokenizer()
    # With a custom tokenizer rouge-score ignores use_stemmer: stemming is the tokenizer's job.
    return rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=True, tokenizer=tokenizer)


def _rouge_items(predictions: list[str], references: list[list[str]], lang: str) -> dict[str, list[float]]:
    scorer = _rouge_scorer(ROUGE_TYPES, lang)
    items: dict[str, list[float]] = {t: [] for t in ROUGE_TYPES}
    for prediction, refs in zip(predictions, references):
        # rougeLsum reads sentences from newlines; the other types ignore them.
        best = scorer.score_multi([split_sentences(r) for r in refs], split_sentences(prediction))
        for rouge_type in ROUGE_TYPES:
            items[rouge_type].append(best[rouge_type].fmeasure)
    return items


def _rouge(predictions: list[str], references: list[list[str]], lang: str) -> dict[str, Any]:
    items = _rouge_items(predictions, references, lang)
    tokenizer = "default-porter-stemmer" if lang == "en" else UnicodeWordTokenizer.name
    return {
        **{t: _mean(values) for t, values in items.items()},
        "rouge_tokenizer": tokenizer,
        "rouge_config": (
            f"rouge-score|tokenizer:{tokenizer}|multi-ref:max-f1-per-type|"
            "rougeLsum-sentences:regex-split|aggregate:mean-f1"
        ),
    }


def _squad_items(predictions: list[str], references: list[list[str]]) -> dict[str, list[float]]:
    pairs = list(zip(predictions, references))
    return {"exact_match": [max(squad_exact_match(p, r) for r in refs) for p, refs in pairs],
            "f1": [max(squad_f1(p, r) for r in refs) for p, refs in pairs]}


def _squad(predictions: list[str], references: list[list[str]]) -> dict[str, Any]:
    items = _squad_items(predictions, references)
    return {**{name: _mean(values) for name, values in items.items()},
            "squad_normalization": "squad-v1.1-official"}


def item_scores(
    metric: Metric,
    predictions: list[str],
    references: list[list[str]],
    lang: str = "en",
) -> dict[str, list[float]]:
    """Per-item 0-100 scores of the metrics that are means over items: their mean is exactly the
    corpus score of :func:`compute_metrics` (ROUGE-1/2/L/Lsum; SQuAD EM and F1; translation exact
    match). BLEU and chrF are not means of sentence scores (corpus n-gram statistics), so they are
    absent: resample their statistics instead (``finetune.significance``)."""
    _check_inputs(predictions, references)
    if metric == "bleu_chrf":
        fractions = {"exact_match": _translation_exact_match(predictions, references)}
    elif metric == "rouge":
        fractions = _rouge_items(predictions, references, lang)
    elif metric == "squad":
        fractions = _squad_items(predictions, references)
    else:
        raise ValueError(f"unknown metric {metric!r}; choose one of bleu_chrf, rouge, squad")
    return {name: [100.0 * f for f in values] for name, values in fractions.items()}


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_squad_answer(text: str) -> str:
    """SQuAD v1.1: lowercase, drop punctuation, drop articles, collapse whitespace (this order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact_match(prediction: str, ground_truth: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_squad_answer(prediction) == normalize_squad_answer(ground_truth))


def squad_f1(prediction: str, ground_truth: str) -> float:
    """Bag-of-tokens F1 of the normalised strings (0.0 if nothing overlaps, even if both empty)."""
    prediction_tokens = normalize_squad_answer(prediction).split()
    truth_tokens = normalize_squad_answer(ground_truth).split()
    n_same = sum((Counter(prediction_tokens) & Counter(truth_tokens)).values())
    if n_same == 0:
        return 0.0
    precision = n_same / len(prediction_tokens)
    recall = n_same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)
