"""Shared test setup: offline hub, quiet tokenizers, data-root and tiny-corpus fixtures."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

# Set before transformers/datasets are imported anywhere: tests must never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
# The Rust tokenizer's thread pool would otherwise warn (and may deadlock) after DataLoader forks.
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Before torch loads libgomp: idle OpenMP threads sleep instead of spinning. The CPU machine's
# second core comes and goes; spinning threads made tiny-model steps 3-10x slower there (measured:
# one DialogSum evaluate 7.7-18.6 s spinning, 2.1-3.5 s passive). CI sets it too (.ci/run).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# `trainer.precision: auto` picks bf16 on CPUs whose bf16 matmul is faster (common/matmul_probe.py);
# the suite pins fp32 so its numbers do not depend on the CPU it runs on (test_throughput tests auto).
os.environ["LMTRAIN_CPU_PRECISION"] = "32-true"
# DeepSpeed JIT-compiles its CPU shared-memory op (~40-80 s) into ~/.cache/torch_extensions, keyed by
# name only: every venv on a machine rebuilds it over the others' build (the include paths differ).
# Inside a venv, tests (and the CLI subprocesses they start) keep their own copy, built once.
if sys.prefix != sys.base_prefix:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))

from common.data_root import data_root as _data_root  # noqa: E402
from tests.local_slurm import local_slurm  # noqa: E402,F401  (session fixture: a real local SLURM)

OPT_IN_MARKERS = ("slow", "gpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`slow` and `gpu` tests run only when the -m expression names their marker (`-m slow`,
    `-m gpu`, `-m "slow or not slow"`): plain `pytest` is the CI suite and `pytest -m "not
    integration"` the quick tier, both without them (pyproject.toml, README "Tests")."""
    named = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", config.getoption("markexpr") or ""))
    left_out = [m for m in OPT_IN_MARKERS if m not in named]
    kept, dropped = [], []
    for item in items:
        (dropped if any(item.get_closest_marker(m) for m in left_out) else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


# A few short, distinct "articles"; some lines are blank / whitespace-only on purpose.
TINY_TEXT_LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "   ",
    "A journey of a thousand miles begins with a single step.",
    "To be, or not to be, that is the question.",
    "",
    "All that glitters is not gold; all who wander are not lost.",
    "Brevity is the soul of wit, said Polonius at length.",
    "Ünïcödé text — with dashes, émojis 🙂 and tabs\tinside.",
    "It was the best of times, it was the worst of times.",
    "Call me Ishmael. Some years ago, never mind how long precisely.",
    "In the beginning the Universe was created.",
    "The fox returned; the dog was still lazy, and the step was single.",
]
TINY_JSON_DOCS = [
    {"text": "Jsonl document one, about foxes and dogs.", "id": 1},
    {"text": "\n\t ", "id": 2},
    {"text": "Jsonl document three: questions of being and gold.", "id": 3},
    {"text": "Jsonl document four, the last of the small set of times.", "id": 4},
]


@pytest.fixture
def data_root() -> Path:
    """The shared data root; skips the test when it is not available on this machine."""
    root = _data_root()
    if root is None:
        pytest.skip("data root not found (set LMTRAIN_DATA_ROOT or provide ../shared/data)")
    return root


@pytest.fixture(scope="session")
def shipped_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """configs/data/tiny_corpus.yaml prepared once per session (~1M tokens, a 4k BPE; ~5-10 s):
    (out_dir, manifest). The gpt-tiny and t5-tiny presets name this corpus config, so their runs
    pointed at out_dir find it prepared (a prepared corpus is reused only if its inputs match)."""
    if _data_root() is None:
        pytest.skip("data root not found (set LMTRAIN_DATA_ROOT or provide ../shared/data)")
    from pretrain.prepare import main as prepare_main

    out_dir = tmp_path_factory.mktemp("shipped") / "tiny_corpus"
    config = Path(__file__).resolve().parent.parent / "configs" / "data" / "tiny_corpus.yaml"
    manifest = prepare_main(["--config", str(config), "--out_dir", str(out_dir)])
    return out_dir, manifest


_LOADED_SPLITS: dict = {}


@pytest.fixture
def shared_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    """``finetune.tasks.load_split`` served from a session-wide cache in this test: the tests that
    run the CLI on the real tasks many times (the suite: 18 runs) read each split once instead of per
    run (Tatoeba's 162k training pairs: ~3.5 s a read). load_split is a pure function of its
    arguments and the data root, and returns an immutable Dataset; tests/test_tasks.py tests it
    without this cache."""
    import finetune.data
    import finetune.eval_items
    import finetune.tasks

    real = finetune.tasks.load_split

    def load_split(task, split, max_examples=None, seed=0):
        key = (str(_data_root()), os.getcwd(), repr(task), split, max_examples, seed)
        if key not in _LOADED_SPLITS:
            _LOADED_SPLITS[key] = real(task, split, max_examples, seed)
        return _LOADED_SPLITS[key]

    for module in (finetune.tasks, finetune.eval_items, finetune.data):  # the modules that call it
        monkeypatch.setattr(module, "load_split", load_split)


@pytest.fixture
def tiny_corpus_files(tmp_path: Path) -> dict[str, Path]:
    """Small local corpus files in tmp_path: {"txt": lines file, "txt2": second lines file, "jsonl": json lines}."""
    src = tmp_path / "src"
    src.mkdir()
    txt = src / "a.txt"
    txt.write_text("\n".join(TINY_TEXT_LINES) + "\n", encoding="utf-8")
    txt2 = src / "b.txt"
    txt2.write_text("\n".join(line[::-1] for line in TINY_TEXT_LINES) + "\n", encoding="utf-8")
    jsonl = src / "c.jsonl"
    jsonl.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in TINY_JSON_DOCS), encoding="utf-8")
    return {"txt": txt, "txt2": txt2, "jsonl": jsonl}
