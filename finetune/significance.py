"""How sure a score is: 95% confidence intervals, and paired tests between two systems on the same items.

A score on n items is a sample; so is the difference between two systems on the same items. We
report both the way MT and QA papers do, with seeded resampling so a rerun gives the same figures:

- **BLEU and chrF** are corpus statistics (n-gram counts summed over items), not means of sentence
  scores. Interval: sacreBLEU's own bootstrap (``sacrebleu.significance``: it resamples the items'
  sufficient statistics with numpy seeded by ``SACREBLEU_SEED``, default 12345, the draws of
  ``sacrebleu --confidence``), 1,000 resamples, 2.5th-97.5th percentile. Paired test: paired
  approximate randomisation (sacreBLEU's recommended test, 10,000 trials) on sacreBLEU's sufficient
  statistics, counting ties with the observed difference as sacreBLEU does not (see
  ``_paired_randomisation``).
- **Means over items** (ROUGE-1/2/L/Lsum, SQuAD EM/F1, translation exact match): percentile
  bootstrap over items of the per-item scores (``finetune.metrics.item_scores``), 1,000
  resamples, numpy seeded by ``seed``. Paired test: paired bootstrap (both systems on the same
  resampled items; p-value as sacreBLEU's/Moses' bootstrap test: how often a resampled |difference|,
  centred on its mean, exceeds the observed one).

Intervals are percentile intervals [lo, hi] (never outside the metric's range, unlike mean ± 2 s.e.
on a score near 0). A difference is called significant when p < ``ALPHA`` (0.05), two-sided.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from finetune.metrics import Metric, item_scores

ALPHA = 0.05
N_BOOTSTRAP = 1000
N_RANDOMISATION = 10_000
DEFAULT_SEED = 12345  # sacreBLEU's default SACREBLEU_SEED; the item bootstrap uses the same
_TIE_TOLERANCE = 1e-9  # relative: the same arrangement summed in another order is the same score


def _corpus_metrics(lang: str) -> dict[str, Any]:
    import sacrebleu

    return {"bleu": sacrebleu.metrics.BLEU(trg_lang=lang), "chrf": sacrebleu.metrics.CHRF()}


def _reference_streams(references: list[list[str]]) -> list[list[str | None]]:
    """sacreBLEU's layout: stream j = the j-th reference of every item, None where an item has fewer."""
    n_streams = max(len(refs) for refs in references)
    return [[refs[j] if j < len(refs) else None for refs in references] for j in range(n_streams)]


def _percentile_interval(samples: np.ndarray) -> list[float]:
    low, high = np.percentile(samples, [2.5, 97.5])
    return [float(low), float(high)]


def _item_bootstrap_indices(n_items: int, n_resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_items, size=(n_resamples, n_items))  # (R, n)


def confidence_intervals(
    metric: Metric,
    predictions: list[str],
    references: list[list[str]],
    lang: str = "en",
    n_resamples: int = N_BOOTSTRAP,
    seed: int = DEFAULT_SEED,
) -> dict[str, Any]:
    """``{"intervals": {score name: [lo, hi]}, "method": {score name: how}}`` at 95% (module doc)."""
    from sacrebleu.significance import _bootstrap_resample

    intervals: dict[str, list[float]] = {}
    method: dict[str, str] = {}
    if metric == "bleu_chrf":
        streams = _reference_streams(references)
        for name, scorer in _corpus_metrics(lang).items():
            stats = scorer._extract_corpus_statistics(predictions, streams)
            sacrebleu_seed, scores = _bootstrap_resample(stats, scorer, n_resamples)
            intervals[name] = _percentile_interval(np.array([s.score for s in scores]))
            method[name] = f"sacrebleu-bootstrap|n:{n_resamples}|seed:{sacrebleu_seed}|percentile-95"
    for name, values in item_scores(metric, predictions, references, lang).items():
        intervals[name] = mean_interval(values, n_resamples, seed)
        method[name] = f"item-bootstrap|n:{n_resamples}|seed:{seed}|percentile-95"
    return {"intervals": intervals, "method": method}


def mean_interval(values: list[float], n_resamples: int = N_BOOTSTRAP, seed: int = DEFAULT_SEED) -> list[float]:
    """95% percentile-bootstrap interval of the mean of per-item ``values``."""
    idx = _item_bootstrap_indices(len(values), n_resamples, seed)
    return _percentile_interval(np.asarray(values, dtype=np.float64)[idx].mean(axis=1))


def paired_bootstrap(baseline: list[float], system: list[float], seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """Paired bootstrap of the difference of two per-item means on the same items (module doc):
    ``{baseline, system, delta, p_value, significant, test}``."""
    va, vb = np.asarray(baseline, dtype=np.float64), np.asarray(system, dtype=np.float64)
    idx = _item_bootstrap_indices(len(vb), N_BOOTSTRAP, seed)
    observed = vb.mean() - va.mean()
    resampled = np.abs(vb[idx].mean(axis=1) - va[idx].mean(axis=1))  # (R,)
    # sacreBLEU / Moses: centre the resampled |differences| (the null), count those at or above
    # |observed| (">=", as in the AR test: identical systems get p = 1, not 1 / (R + 1)).
    null = resampled - resampled.mean()
    p_value = (np.sum(null >= abs(observed) - _TIE_TOLERANCE * max(abs(observed), 1.0)) + 1) / (len(null) + 1)
    return _row(va.mean(), vb.mean(), float(p_value), f"paired-bootstrap|n:{N_BOOTSTRAP}|seed:{seed}")


def paired_test(
    metric: Metric,
    baseline: list[str],
    system: list[str],
    references: list[list[str]],
    lang: str = "en",
    seed: int = DEFAULT_SEED,
) -> dict[str, dict[str, Any]]:
    """Is ``system`` different from ``baseline`` on the same items? Per score name:
    ``{baseline, system, delta (system - baseline), p_value, significant, test}`` (module doc)."""
    if len(baseline) != len(system) or len(system) != len(references):
        raise ValueError(f"a paired test needs the same items: {len(baseline)} baseline and {len(system)} system "
                         f"predictions for {len(references)} reference lists")
    out: dict[str, dict[str, Any]] = {}
    if metric == "bleu_chrf":
        out.update(_paired_randomisation(baseline, system, references, lang, seed))
    a = item_scores(metric, baseline, references, lang)
    b = item_scores(metric, system, references, lang)
    for name in a:
        out[name] = paired_bootstrap(a[name], b[name], seed)
    return out


def _paired_randomisation(baseline: list[str], system: list[str], references: list[list[str]], lang: str,
                          seed: int) -> dict[str, dict[str, Any]]:
    """Paired approximate randomisation on sacreBLEU's sufficient statistics (module doc).

    As sacreBLEU's ``PairedTest(test_type="ar")`` (swap the two systems' outputs item by item, recompute
    the corpus scores), but a trial counts when its |difference| is *at least* the observed one. sacreBLEU
    counts only strictly larger ones, so every trial that reproduces the observed arrangement of a tie
    is lost: two systems that differ on 2 of 300 items got p = 0.0001 from it instead of ~0.5.
    """
    streams = _reference_streams(references)
    rng = np.random.default_rng(seed)
    swap = rng.integers(0, 2, size=(N_RANDOMISATION, len(system))).astype(bool)  # (R, n): take the other output
    out = {}
    for name, scorer in _corpus_metrics(lang).items():
        stats_a = np.asarray(scorer._extract_corpus_statistics(baseline, streams), dtype=np.float64)  # (n, k)
        stats_b = np.asarray(scorer._extract_corpus_statistics(system, streams), dtype=np.float64)
        score_a = scorer._compute_score_from_stats(stats_a.sum(0)).score
        score_b = scorer._compute_score_from_stats(stats_b.sum(0)).score
        shuffled_a = ~swap @ stats_a + swap @ stats_b  # (R, k): each trial's pseudo-system totals
        shuffled_b = swap @ stats_a + ~swap @ stats_b
        deltas = np.abs([scorer._compute_score_from_stats(a).score - scorer._compute_score_from_stats(b).score
                         for a, b in zip(shuffled_a, shuffled_b)])
        observed = abs(score_b - score_a)
        p_value = (np.sum(deltas >= observed - _TIE_TOLERANCE * max(observed, 1.0)) + 1) / (N_RANDOMISATION + 1)
        out[name] = _row(score_a, score_b, float(p_value),
                         f"paired-ar|trials:{N_RANDOMISATION}|seed:{seed}|stats:sacrebleu-{_sacrebleu_version()}")
    return out


def _sacrebleu_version() -> str:
    import sacrebleu

    return sacrebleu.__version__


def _row(baseline: float, system: float, p_value: float, test: str) -> dict[str, Any]:
    return {"baseline": float(baseline), "system": float(system), "delta": float(system - baseline),
            "p_value": p_value, "significant": p_value < ALPHA, "test": test}


def format_interval(score: float, interval: list[float] | None, digits: int = 2) -> str:
    """``12.34 [10.10, 14.56]`` (just the score when there is no interval)."""
    if not interval:
        return f"{score:.{digits}f}"
    return f"{score:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
