"""A peer run of JoeyNMT 2.3.0 beside `finetune compare`: the same splits, tokenizer size and minutes.

    nice -n 19 .venv/bin/python benchmarks/joeynmt_peer.py            # 3 models x 6 min of training, ~30 min
    nice -n 19 .venv/bin/python benchmarks/joeynmt_peer.py --budget-minutes 0.5 --models transformer \\
        --max-test-examples 200 --out /tmp/joey_smoke.md                # smoke run

Our RNN / transformer numbers (configs/compare/translation_en_fr.yaml) mean more next to a public NMT
toolkit trained on the same data for the same minutes. What is matched, and how:

* **Environment.** `.venv-joeynmt/` (created when missing): `torch==2.13.0` first (the local CPU wheel;
  a bare `torch` pulls a CUDA build), then `PINS`. joeynmt 2.3.0 pins protobuf<3.21 (3.20.3: pure
  Python, imports on 3.11), imports `importlib_metadata` without declaring it, and calls
  `SentencePieceProcessor.SetVocabulary`, which sentencepiece >= 0.2.1 dropped (0.2.0 has it).
  torch >= 2.6 loads with weights_only=True: JoeyNMT's checkpoints (tensors, dicts, numbers, a
  generator state) load under it, so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is not needed (torch 2.13:
  `joeynmt test` on best.ckpt). OMP_WAIT_POLICY=PASSIVE unless set (spinning OpenMP stalls a nice'd
  run on shared cores: 12 s vs 0.5-0.9 s per RNN update seen here); give our compare the same env.
* **Data.** The rows our compare reads (`finetune.tasks.load_split`): the whole train split, the same
  200 validation sentences (`subset_indices(n, 200, seed 1234)`, what `--data.max_val_examples 200`
  picks), the whole test split, as JoeyNMT plain-text files `{train,dev,test}.{en,fr}`.
* **Tokenizer.** JoeyNMT 2.3 reads sentencepiece and subword-nmt models only (joeynmt/tokenizers.py),
  not a HF `tokenizers` BPE: one joint sentencepiece BPE trained on train source + target, of our
  total size (`tokenizer_vocab_size`, 8000 with 4 specials and 256 byte-fallback pieces, so as with
  our byte-level BPE nothing is unknown), identity normalisation (lossless: French no-break spaces
  stay); one vocabulary for source and target. JoeyNMT detokenizes its outputs (sentencepiece decode).
* **Models.** GRU + additive ("bahdanau") attention; LSTM + bilinear ("luong" = Luong's "general")
  attention with input feeding; both: bidirectional 1-layer encoder, emb/hidden 256, dropout 0.1,
  bridge, output layer tied to the target embedding (`tied_softmax`, our `tie_embeddings`).
  Transformer 3+3, d 256, 4 heads, FFN 1024, dropout 0.1, `layer_norm: "pre"` set on both sides
  (JoeyNMT's defaults are mixed: pre-norm encoder layers without final norm, post-norm decoder), all
  embeddings tied. No `rnn_no_attention`: JoeyNMT's RecurrentDecoder requires attention.
* **Recipe** (ours where JoeyNMT can express it): batch 64 sentences, Adam (0.9, 0.95), our peak LR
  and warmup, clip norm 1.0, token-averaged loss, label smoothing 0.1 for the transformer, best
  checkpoint by validation BLEU. JoeyNMT's schedule (warmup, then inverse square root) never anneals.
* **Budget.** JoeyNMT stops on epochs or updates only. A subclass of its TrainManager (training step
  untouched) counts training time from the first update, validation and checkpointing excluded (as
  common/wall_clock_budget.py), validates every `val_every_minutes` of it, and at the budget raises
  JoeyNMT's own stop flag (`is_max_update`, what `updates:` sets) after the current update, then
  validates once more (as Lightning does when ours stops).
* **Test.** `python -m joeynmt test` on best.ckpt, greedy (`beam_size: 1`), at most `max_new_tokens`
  tokens; the hypotheses are scored here by `finetune.metrics.compute_metrics("bleu_chrf", ...)`
  (sacreBLEU corpus BLEU 13a, chrF) with 95% intervals and, where our compare's predictions exist, a
  paired test against our model of the same name (`finetune.significance`).

Writes `--out` (markdown) and a `.json` twin; each model's run stays in `--work-dir/<model>/`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # inherited by the JoeyNMT processes (docstring)
REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv-joeynmt"
JOEY_PY = VENV / "bin" / "python"
# Installs and imports on Python 3.11 with torch 2.13.0 (2026-12): joeynmt's own pin protobuf<3.21 (3.20.3),
# the undeclared importlib_metadata, and the versions the resolver picked for what joeynmt imports.
PINS = ["joeynmt==2.3.0", "protobuf==3.20.3", "importlib_metadata==10.2.0", "tensorboard==2.20.0",
        "numpy==2.4.6", "sentencepiece==0.2.0", "subword-nmt==0.3.8", "sacrebleu==2.6.0"]
COMPARE = {"tatoeba_en_fr": "configs/compare/translation_en_fr.yaml",
           "multi30k_en_fr": "configs/compare/translation_multi30k_en_fr.yaml"}
MODELS = ("rnn_bahdanau", "rnn_luong", "transformer")
VAL_EXAMPLES, SEED = 200, 1234  # finetune/compare.py's --data.max_val_examples; FinetuneDataModule's seed
WORKER = Path(__file__).with_name("joeynmt_worker.py")  # the JoeyNMT side, run under .venv-joeynmt
sys.path.insert(0, str(WORKER.parent))
from joeynmt_worker import NEVER  # noqa: E402 - beside this script


# ---- our side (.venv) ------------------------------------------------------------------------------
def ensure_venv() -> None:
    """Create .venv-joeynmt (torch==2.13.0 first, then PINS) unless it already holds them."""
    stamp = VENV / "lmtrain-pins.txt"
    want = "\n".join(["torch==2.13.0", *PINS])
    if stamp.is_file() and stamp.read_text() == want and JOEY_PY.is_file():
        return
    if not JOEY_PY.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    for packages in (["torch==2.13.0"], PINS):  # torch first: the local CPU wheel, before anything pulls torch
        subprocess.run([str(JOEY_PY), "-m", "pip", "install", "-q", *packages], check=True)
    subprocess.run([str(JOEY_PY), "-c", "import joeynmt.training, joeynmt.prediction"], check=True)
    stamp.write_text(want)


def run_logged(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` with its output in ``log``; returns its wall seconds (raises with the log's tail)."""
    started = time.time()
    with log.open("w", encoding="utf-8") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if code:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:])
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({code}); end of {log}:\n{tail}")
    return time.time() - started


def write_splits(task: Any, data_dir: Path, max_test: int | None) -> dict[str, list]:
    """train / dev (our 200 validation sentences) / test as {split}.{lang} files; returns the test items."""
    from finetune.eval_items import subset_indices
    from finetune.tasks import load_split

    data_dir.mkdir(parents=True, exist_ok=True)
    test: dict[str, list] = {}
    for split, name, n in (("train", "train", None), ("dev", "validation", VAL_EXAMPLES), ("test", "test", max_test)):
        cols = load_split(task, name).select_columns(["id", "source", "target", "references"])[:]
        keep = subset_indices(len(cols["id"]), n, SEED)
        for lang, column in ((task.source_lang, "source"), (task.target_lang, "target")):
            lines = (" ".join(cols[column][i].splitlines()) for i in keep)  # one line per sentence
            (data_dir / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
        if split == "test":
            test = {k: [cols[k][i] for i in keep] for k in ("id", "source", "references")}
            test["n_total"] = [len(cols["id"])]
    return test


def joey_config(name: str, data_dir: Path, model_dir: Path, ours: dict[str, Any], src: str, trg: str) -> dict:
    """The JoeyNMT YAML of model ``name`` (module docstring: what is matched)."""
    side = {"level": "bpe", "lowercase": False, "normalize": False, "max_length": 128, "min_length": 1,
            "voc_file": str(data_dir / "vocab.txt"), "tokenizer_type": "sentencepiece",
            "tokenizer_cfg": {"model_file": str(data_dir / "spm.model"), "pretokenizer": "none"}}
    if name == "transformer":
        layers = {"type": "transformer", "num_layers": 3, "num_heads": 4, "hidden_size": 256, "ff_size": 1024,
                  "dropout": 0.1, "layer_norm": "pre", "embeddings": {"embedding_dim": 256, "scale": True}}
        model = {"tied_embeddings": True, "tied_softmax": True, "encoder": layers, "decoder": dict(layers)}
    else:
        cell, attention = ("gru", "bahdanau") if name == "rnn_bahdanau" else ("lstm", "luong")
        rnn = {"type": "recurrent", "rnn_type": cell, "hidden_size": 256, "num_layers": 1, "dropout": 0.1,
               "embeddings": {"embedding_dim": 256, "scale": False}}
        model = {"tied_embeddings": False, "tied_softmax": True, "encoder": {**rnn, "bidirectional": True},
                 "decoder": {**rnn, "hidden_dropout": 0.1, "attention": attention, "init_hidden": "bridge",
                             "input_feeding": name == "rnn_luong"}}
    smoothing = ours.get("model_options", {}).get(name, {}).get("label_smoothing", ours.get("label_smoothing", 0.0))
    return {
        "name": f"joeynmt_peer_{name}", "joeynmt_version": "2.3.0", "model_dir": str(model_dir), "random_seed": SEED,
        "data": {"train": str(data_dir / "train"), "dev": str(data_dir / "dev"), "test": str(data_dir / "test"),
                 "dataset_type": "plain", "src": {"lang": src, **side}, "trg": {"lang": trg, **side}},
        "testing": {"load_model": str(model_dir / "best.ckpt"), "beam_size": 1, "batch_size": 64,
                    "batch_type": "sentence", "max_output_length": ours.get("max_new_tokens", 48),
                    "eval_metrics": ["bleu"], "sacrebleu_cfg": {"tokenize": "13a"}},
        "training": {"optimizer": "adam", "adam_betas": [0.9, 0.95], "learning_rate": ours.get("lr", 1e-3),
                     "learning_rate_min": 1e-8, "scheduling": "warmupinversesquareroot",
                     "learning_rate_warmup": ours.get("warmup_steps", 200), "clip_grad_norm": 1.0,
                     "weight_decay": 0.0, "label_smoothing": smoothing, "normalization": "tokens",
                     "batch_size": ours.get("batch_size", 64), "batch_type": "sentence", "epochs": 1000,
                     "validation_freq": NEVER, "logging_freq": 50, "early_stopping_metric": "bleu",
                     "keep_best_ckpts": 2, "print_valid_sents": [0], "shuffle": True, "use_cuda": False, "overwrite": True},
        "model": model}


def run_model(name: str, args: argparse.Namespace, ours_cfg: dict, data_dir: Path, test: dict, lang: str,
              src: str) -> dict[str, Any]:
    """Train ``name`` with JoeyNMT under the budget, test its best checkpoint, score it."""
    import yaml

    from finetune.metrics import compute_metrics
    from finetune.significance import confidence_intervals

    run_dir = args.work_dir / name
    config, model_dir = run_dir / "config.yaml", run_dir / "model"
    run_dir.mkdir(parents=True, exist_ok=True)
    plain = json.loads(json.dumps(joey_config(name, data_dir, model_dir, ours_cfg, src, lang)))  # no YAML aliases
    config.write_text(yaml.safe_dump(plain, sort_keys=False))
    print(f"[joeynmt_peer] {name}: training {args.budget_minutes:g} min (log: {run_dir / 'train.out'})", flush=True)
    fit_s = run_logged([str(JOEY_PY), str(WORKER), "_train", str(config), str(args.budget_minutes * 60),
                        str(args.val_every_minutes * 60)], run_dir / "train.out")
    budget = json.loads((model_dir / "budget.json").read_text())
    print(f"[joeynmt_peer] {name}: {budget['steps']} updates in {budget['train_seconds'] / 60:.2f} min", flush=True)
    test_s = run_logged([str(JOEY_PY), "-m", "joeynmt", "test", str(config), "-o", str(model_dir / "hyps")],
                        run_dir / "test.out")
    predictions = (model_dir / "hyps.test").read_text(encoding="utf-8").rstrip("\n").split("\n")
    if len(predictions) != len(test["id"]):
        raise SystemExit(f"{name}: {len(predictions)} hypotheses for {len(test['id'])} test sentences")
    metrics = compute_metrics("bleu_chrf", predictions, test["references"], lang=lang)
    ci = confidence_intervals("bleu_chrf", predictions, test["references"], lang=lang)["intervals"]
    return {"name": name, **budget, "fit_wall_seconds": fit_s, "test_wall_seconds": test_s,
            "bleu": metrics["bleu"], "chrf": metrics["chrf"], "exact_match": metrics["exact_match"],
            "ci95": {k: ci[k] for k in ("bleu", "chrf")}, "bleu_signature": metrics["bleu_signature"],
            "chrf_signature": metrics["chrf_signature"], "predictions": predictions}


def load_ours(path: Path, task: str) -> dict[str, dict[str, Any]]:
    """Our compare's numbers per model (comparison.json) and its test predictions by id, where present."""
    path = path / "comparison.json" if path.is_dir() else path
    if not path.is_file():
        return {}
    out = {}
    for m in json.loads(path.read_text())["models"]:
        preds = path.parent / m["name"] / "test" / "eval" / f"{task}-test-0shot" / "predictions.jsonl"
        rows = [json.loads(line) for line in preds.open(encoding="utf-8")] if preds.is_file() else []
        out[m["name"]] = {**{k: m.get(k) for k in ("params", "steps", "train_minutes", "train_seconds", "bleu",
                                                   "chrf", "exact_match", "ci95", "n", "n_total")},
                          "predictions": {r["id"]: r["prediction"] for r in rows}, "source": str(path)}
    return out


def paired(joey: dict[str, Any], ours: dict[str, Any], test: dict, lang: str) -> dict[str, Any] | None:
    """JoeyNMT minus ours on the same test sentences (paired AR test), if ours predicted every one."""
    from finetune.significance import paired_test

    if not all(i in ours["predictions"] for i in test["id"]):
        return None
    baseline = [ours["predictions"][i] for i in test["id"]]
    tests = paired_test("bleu_chrf", baseline, joey["predictions"], test["references"], lang=lang)
    return {**{f"{k}_{f}": tests[k][f] for k in ("bleu", "chrf") for f in ("baseline", "delta", "p_value", "significant")},
            "test": tests["bleu"]["test"]}


CAVEATS = [
    "JoeyNMT's schedule does not anneal to the budget (no cosine): it stops at the LR in the table; ours "
    "fits its cosine to the budget after timing 40 steps. JoeyNMT's first update runs at the peak LR.",
    "JoeyNMT's training time includes its batch loading and logging between updates (with the optimizer "
    "step ~30 ms per update on 2 cores); ours is timed from batch start to batch end.",
    "Architectures are JoeyNMT's own: its 'bahdanau' attention is queried by the new decoder state (a "
    "Luong-style decoder) and without input feeding its RNN never sees the context; its transformer is "
    "pre-norm with ReLU (ours: post-norm Marian). Our encoder input carries the task prompt "
    "(`translate English to French: ...`), JoeyNMT's the bare sentence.",
    "JoeyNMT turns an empty hypothesis into `<unk>`; ours stays empty.",
    "No JoeyNMT peer for `rnn_no_attention`: its RecurrentDecoder requires attention."]


def _delta(p: dict[str, Any], k: str) -> str:
    """``ours -> JoeyNMT | difference[ *] (p)`` for score ``k`` of a paired test."""
    star = " *" if p[f"{k}_significant"] else ""
    return (f"{p[f'{k}_baseline']:.2f} -> {p[f'{k}_baseline'] + p[f'{k}_delta']:.2f} | "
            f"{p[f'{k}_delta']:+.2f}{star} ({p[f'{k}_p_value']:.4f})")


def render(report: dict[str, Any]) -> str:
    """The results file: settings, one row per model and toolkit, paired tests, curves, caveats."""
    from finetune.significance import format_interval as fmt

    s, m, v = report["settings"], report["machine"], report["joeynmt_versions"]
    lines = [f"# JoeyNMT {v.get('joeynmt', '?')} beside our models on `{s['task']}`", "",
             f"Command ({report['date']}, total {report['wall_seconds'] / 60:.1f} min): `{report['command']}`", "",
             f"Machine: {m['cpu']}, {m['cpus']} cores, ISA {', '.join(m['isa'])}; env {m['env']}; git {m['git']}. "
             f"JoeyNMT side (`.venv-joeynmt`): {', '.join(f'{k} {x}' for k, x in v.items())}; ours: torch {m['torch']}.", "",
             f"Budget: {s['budget_minutes']:g} min of training time per model (validation and checkpoint saving "
             f"excluded; JoeyNMT stopped by its own `is_max_update` flag, raised by a TrainManager subclass that "
             f"times it), validation every {s['val_every_minutes']:g} min on our {VAL_EXAMPLES} validation "
             f"sentences (greedy BLEU, best checkpoint kept). Tokenizer: joint sentencepiece BPE of "
             f"{s['vocab_size']} with byte fallback (ours: byte-level BPE of {s['vocab_size']}). Recipe: "
             f"{s['batch_size']} sentences per update, Adam (0.9, 0.95), peak LR {s['lr']:g}, warmup "
             f"{s['warmup_steps']} then inverse square root (ours: cosine), clip norm 1.0, label smoothing 0.1 "
             f"for the transformer. Test: {report['test_n']} of {report['test_n_total']} sentences, greedy, "
             f"`{report['bleu_signature']}`, 95% bootstrap intervals.", "",
             "| model | toolkit | parameters | updates | training min | fit wall min | LR at stop | best val BLEU "
             "(update) | test BLEU [95% CI] | chrF [95% CI] |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["joeynmt"]:
        lines.append(f"| {r['name']} | JoeyNMT | {r['params'] / 1e6:.2f} M | {r['steps']} | {r['train_seconds'] / 60:.2f} | "
                     f"{r['fit_wall_seconds'] / 60:.1f} | {r['lr_at_stop']:.2e} | {r['best_val_bleu']:.2f} "
                     f"({r['best_step']}) | {fmt(r['bleu'], r['ci95']['bleu'])} | {fmt(r['chrf'], r['ci95']['chrf'])} |")
        if o := report["ours"].get(r["name"]):
            ci, train = o.get("ci95") or {}, o.get("train_minutes")
            lines.append(f"| {r['name']} | ours | {o['params'] / 1e6:.2f} M | {o['steps']} | "
                         f"{'–' if train is None else f'{train:.2f}'} | {o['train_seconds'] / 60:.1f} | ~0 (cosine) | – | "
                         f"{fmt(o['bleu'], ci.get('bleu'))} (n={o.get('n')}) | {fmt(o['chrf'], ci.get('chrf'))} |")
    if not report["ours"]:
        lines += ["", f"Ours: no results at `{s['ours']}` (`python -m finetune compare --config "
                      f"{s['compare_config']}` writes them)."]
    rows = [(r["name"], p) for r in report["joeynmt"] if (p := r.get("paired"))]
    if rows:
        lines += ["", "JoeyNMT minus ours on the same test sentences (paired approximate randomisation; "
                      "* = p < 0.05):", "", "| model | BLEU ours -> JoeyNMT | difference (p) | chrF ours -> JoeyNMT "
                      "| difference (p) |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {_delta(p, 'bleu')} | {_delta(p, 'chrf')} |" for name, p in rows]
        lines += ["", f"Test: `{rows[0][1]['test']}`."]
    lines += ["", "JoeyNMT's validation BLEU against training minutes (min / update: BLEU):", ""]
    lines += [f"- {r['name']}: " + ", ".join(f"{c['train_minutes']:.2f} / {c['step']}: {c['bleu']:.2f}" for c in r["curve"])
              for r in report["joeynmt"]]
    tokens = {n: t for n, t in s.get("ours_batch_tokens", {}).items() if t}  # our YAML may batch by tokens
    caveats = CAVEATS + [f"Our compare YAML batches {n} by {t} tokens; JoeyNMT here by {s['batch_size']} sentences."
                         for n, t in tokens.items()]
    return "\n".join(lines + ["", "Caveats:", ""] + [f"- {c}" for c in caveats]) + "\n"


def command_line() -> str:
    """How this process was started, as one would type it from the repository root."""
    exe = os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO)) else sys.executable
    return " ".join([*(["nice", "-n", str(os.nice(0))] if os.nice(0) else []), exe, *sys.argv])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="tatoeba_en_fr", choices=sorted(COMPARE))
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=[*MODELS, "rnn_no_attention"])
    p.add_argument("--budget-minutes", type=float, help="training minutes per model (default: our compare YAML's: "
                                                        "6 for tatoeba_en_fr, 4 for multi30k_en_fr)")
    p.add_argument("--val-every-minutes", type=float, help="validate every this many training minutes "
                                                           "(default: the YAML's with its budget, else budget / 6)")
    p.add_argument("--max-test-examples", type=int, help="smoke runs only: a seeded subset of the test split")
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "joeynmt_peer", help="data, tokenizer, runs")
    p.add_argument("--warmup-steps", type=int, help="LR warmup (default: our compare YAML's; give the study's "
                                                    "compare_overrides value when comparing with a study run)")
    p.add_argument("--ours", type=Path, help="our comparison.json or its directory (default: the YAML's out_dir)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "joeynmt_peer.md")
    args = p.parse_args(argv)
    if args.budget_minutes is not None and args.budget_minutes <= 0:
        p.error("--budget-minutes must be > 0")
    if "rnn_no_attention" in args.models:
        p.error("rnn_no_attention has no JoeyNMT peer: its RecurrentDecoder takes attention 'bahdanau' or 'luong' only")
    sys.path.insert(0, str(REPO))
    import yaml

    from benchmarks.step_report import machine
    from finetune.tasks import load_task

    started, ours_cfg = time.time(), yaml.safe_load((REPO / COMPARE[args.task]).read_text())
    if args.warmup_steps is not None:
        ours_cfg["warmup_steps"] = args.warmup_steps
    yaml_budget = float(ours_cfg.get("budget_minutes", 6))
    args.budget_minutes = args.budget_minutes or yaml_budget
    if args.val_every_minutes is None:
        same = args.budget_minutes == yaml_budget and ours_cfg.get("val_every_minutes")
        args.val_every_minutes = ours_cfg["val_every_minutes"] if same else args.budget_minutes / 6
    args.ours, args.work_dir = args.ours or REPO / ours_cfg["out_dir"], args.work_dir.resolve()
    task, vocab = load_task(args.task), ours_cfg.get("tokenizer_vocab_size", 8000)
    ensure_venv()
    data_dir = args.work_dir / "data"
    test = write_splits(task, data_dir, args.max_test_examples)
    stamp, spm_key = data_dir / "spm.json", {"task": task.name, "vocab_size": vocab, "pins": PINS}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == spm_key):  # ~2 s: retrained when stale
        run_logged([str(JOEY_PY), str(WORKER), "_spm", str(data_dir), task.source_lang, task.target_lang, str(vocab)],
                   data_dir / "spm.out")
        stamp.write_text(json.dumps(spm_key))
    ours = load_ours(args.ours, task.name)
    results = []
    for name in args.models:
        r = run_model(name, args, ours_cfg, data_dir, test, task.target_lang, task.source_lang)
        r["paired"] = paired(r, ours[name], test, task.target_lang) if name in ours else None
        results.append(r)
    report = {
        "command": command_line(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(("OMP_WAIT_POLICY", "OMP_NUM_THREADS")), "joeynmt_versions": results[0]["versions"],
        "wall_seconds": time.time() - started, "test_n": len(test["id"]), "test_n_total": test["n_total"][0],
        "bleu_signature": results[0]["bleu_signature"], "chrf_signature": results[0]["chrf_signature"],
        "settings": {"task": task.name, "budget_minutes": args.budget_minutes, "val_every_minutes": args.val_every_minutes,
                     "vocab_size": vocab, "batch_size": ours_cfg.get("batch_size", 64), "lr": ours_cfg.get("lr", 1e-3),
                     "warmup_steps": ours_cfg.get("warmup_steps", 200), "ours": str(args.ours), "pins": PINS,
                     "compare_config": COMPARE[args.task], "work_dir": str(args.work_dir),
                     "ours_batch_tokens": {n: (ours_cfg.get("model_options") or {}).get(n, {}).get(
                         "batch_tokens", ours_cfg.get("batch_tokens")) for n in args.models}},
        "joeynmt": [{k: x for k, x in r.items() if k != "predictions"} for r in results],
        "ours": {k: {f: x for f, x in o.items() if f != "predictions"} for k, o in ours.items() if k in args.models}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(report), encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(args.out.read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
