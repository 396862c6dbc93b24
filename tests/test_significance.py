"""Confidence intervals and paired tests (finetune.significance): seeded, sacreBLEU's own resampling
for BLEU/chrF, calibrated item bootstrap for means, and paired tests that find real differences
and not identical systems."""

from __future__ import annotations

import random

import numpy as np
import pytest
import sacrebleu

from finetune.metrics import compute_metrics, item_scores
from finetune.significance import confidence_intervals, format_interval, paired_test

WORDS = "le chat est sur la table un chien mange du pain et boit de eau".split()


def _corpus(n: int, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    rng = random.Random(seed)
    refs = [[" ".join(rng.choices(WORDS, k=8))] for _ in range(n)]
    hyps = [" ".join(w if rng.random() < 0.5 else rng.choice(WORDS) for w in r[0].split()) for r in refs]
    return hyps, refs


def test_bleu_interval_uses_sacrebleus_own_bootstrap() -> None:
    hyps, refs = _corpus(300)
    ci = confidence_intervals("bleu_chrf", hyps, refs, lang="fr")
    streams = [[r[0] for r in refs]]
    for name, metric in (("bleu", sacrebleu.metrics.BLEU(trg_lang="fr")), ("chrf", sacrebleu.metrics.CHRF())):
        score = metric.corpus_score(hyps, streams, n_bootstrap=1000)  # what `sacrebleu --confidence` prints
        low, high = ci["intervals"][name]
        assert low < score.score < high
        # The same resamples: sacreBLEU's mean ± half-range interval and our percentile one agree closely.
        assert (low + high) / 2 == pytest.approx(float(score._mean), abs=0.15 * float(score._ci))
        assert (high - low) / 2 == pytest.approx(float(score._ci), rel=0.05)
        assert "sacrebleu-bootstrap|n:1000|seed:12345" in ci["method"][name]
    assert ci == confidence_intervals("bleu_chrf", hyps, refs, lang="fr")  # seeded: a rerun gives the same


def test_item_bootstrap_is_calibrated() -> None:
    """95% intervals of a mean of 0/1 items cover the true rate in about 95% of samples."""
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(200):
        correct = rng.random(150) < 0.3
        predictions = ["paris" if c else "rome" for c in correct]
        low, high = confidence_intervals("squad", predictions, [["paris"]] * 150, seed=trial)["intervals"]["f1"]
        covered += low <= 30.0 <= high
    assert 0.90 <= covered / 200 <= 0.99


def test_item_scores_average_to_the_corpus_scores() -> None:
    hyps, refs = _corpus(50, seed=3)
    for metric in ("rouge", "squad", "bleu_chrf"):
        corpus = compute_metrics(metric, hyps, refs)
        for name, values in item_scores(metric, hyps, refs).items():
            assert np.mean(values) == pytest.approx(corpus[name], abs=1e-9)
    with pytest.raises(ValueError, match="unknown metric"):
        item_scores("meteor", hyps, refs)  # type: ignore[arg-type]


@pytest.mark.parametrize("metric", ["bleu_chrf", "rouge", "squad"])
def test_paired_tests_find_a_real_difference_and_not_an_identical_system(metric: str) -> None:
    hyps, refs = _corpus(300, seed=1)
    better = [r[0] if i % 3 == 0 else h for i, (h, r) in enumerate(zip(hyps, refs))]  # a third made exact
    result = paired_test(metric, hyps, better, refs, lang="fr")
    assert result and all(row["significant"] and row["delta"] > 0 for row in result.values())
    same = paired_test(metric, hyps, list(hyps), refs, lang="fr")
    assert all(row["p_value"] == 1.0 and not row["significant"] and row["delta"] == 0 for row in same.values())
    # Two items of 300 changed: not a difference the test should call significant.
    nudged = [r[0] if i in (5, 17) else h for i, (h, r) in enumerate(zip(hyps, refs))]
    assert not any(row["significant"] for row in paired_test(metric, hyps, nudged, refs, lang="fr").values())
    with pytest.raises(ValueError, match="the same items"):
        paired_test(metric, hyps, hyps[:-1], refs)


def test_format_interval() -> None:
    assert format_interval(12.3456, [10.1, 14.56]) == "12.35 [10.10, 14.56]"
    assert format_interval(1.0, None) == "1.00"


def test_randomisation_counts_ties_that_sacrebleu_drops() -> None:
    """Two systems that differ on 2 of 300 items: half the trials reproduce the observed difference
    exactly, so p ~ 0.5. sacreBLEU's PairedTest counts only strictly larger differences."""
    from sacrebleu.significance import PairedTest

    hyps, refs = _corpus(300, seed=1)
    nudged = [r[0] if i in (5, 17) else h for i, (h, r) in enumerate(zip(hyps, refs))]
    ours = paired_test("bleu_chrf", hyps, nudged, refs, lang="fr")["bleu"]
    assert 0.4 < ours["p_value"] < 0.6
    _, theirs = PairedTest([("a", hyps), ("b", nudged)], {"BLEU": sacrebleu.metrics.BLEU(trg_lang="fr")},
                           [[r[0] for r in refs]], test_type="ar", n_samples=2000)()
    assert theirs["BLEU"][1].p_value < 0.01  # the reason we count ties ourselves
    assert theirs["BLEU"][1].score == pytest.approx(ours["system"])
