"""lm-evaluation-harness on a model that is already in memory: what `finetune harness` and the
in-loop `common.downstream_eval.DownstreamEval` share.

* **Tasks** (:func:`resolve_tasks`): a ``--tasks`` entry is a YAML file, the ``task:`` name of a YAML
  in ``configs/harness/`` (or an ``include_path`` folder), or a task lm-eval ships (``hellaswag``,
  ``wikitext``, ...). In our YAMLs a relative ``dataset_kwargs.data_files`` path is under the data
  root (`common.data_root`: ``LMTRAIN_DATA_ROOT``, else ``../shared/data`` next to the repository),
  as the ``local:`` paths of ``configs/tasks/`` are, so they run from any working directory and on
  a fresh clone. An unknown name is refused with its close matches, and a task whose dataset is on
  the hub is refused in one line while the hub is switched off (``HF_DATASETS_OFFLINE`` /
  ``HF_HUB_OFFLINE``), before any model is loaded.
* **Model** (:func:`wrap_model`): lm-eval's ``HFLM`` around the model instance and its tokenizer (no
  export step), the backend (causal / seq2seq) from our model kind, the context from
  `common.model_context.usable_context` (the trained length for our checkpoints, not the position
  table's size). A model or tokenizer HFLM cannot use is refused in one line.
* **Scores** (:func:`task_scores`): lm-eval's ``"acc,none"`` keys flattened to ``acc``,
  ``acc_stderr``; the metrics themselves are lm-eval's (``acc``/``acc_norm`` for multiple choice,
  ``word_perplexity``/``byte_perplexity``/``bits_per_byte`` for rolling log-likelihood).
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.data_files import expand
from common.data_root import ENV_VAR, data_root
from common.model_context import usable_context

if TYPE_CHECKING:
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

HARNESS_TASK_DIR = Path(__file__).resolve().parent.parent / "configs" / "harness"
# datasets builders that read local files; any other dataset_path is a hub dataset (or a local folder).
LOCAL_BUILDERS = frozenset({"json", "csv", "text", "parquet", "arrow", "pandas"})
_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off for datasets (a hub task cannot load then)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def local_task_files(include_paths: Sequence[str | Path] = ()) -> dict[str, Path]:
    """``task:`` name -> YAML file, for ``configs/harness/`` and each folder of ``include_paths``
    (later folders win, as in lm-eval's own ``include_path``)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    found: dict[str, Path] = {}
    for folder in (HARNESS_TASK_DIR, *map(Path, include_paths)):
        if not folder.is_dir():
            raise FileNotFoundError(f"include_path {str(folder)!r} is not a folder of task YAMLs")
        for path in sorted(folder.rglob("*.yaml")):
            try:
                name = load_yaml(path, resolve_func=False, recursive=False).get("task")
            except Exception:  # noqa: BLE001 - not a task file (lm-eval's own index skips these too)
                continue
            if isinstance(name, str):
                found[name] = path
    return found


def load_task_yaml(path: Path) -> dict[str, Any]:
    """A task YAML as lm-eval reads it (``!function`` resolved, ``include:`` merged), with relative
    ``dataset_kwargs.data_files`` resolved under the data root; raises naming the file and key."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        config = load_yaml(path, resolve_func=True)
    except Exception as e:  # noqa: BLE001 - YAML syntax, a missing !function module: one line
        raise ValueError(f"task file {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not isinstance(config.get("task"), str):
        raise ValueError(f"task file {path}: no `task:` name (a group YAML? pass its task names instead)")
    kwargs = config.get("dataset_kwargs") or {}
    if "data_files" in kwargs:
        kwargs["data_files"] = _resolve_data_files(kwargs["data_files"], path)
    return config


def _resolve_data_files(files: Any, path: Path) -> Any:
    """Every entry of ``data_files`` (a path, a list, or split -> path/list) as absolute file paths."""
    if isinstance(files, dict):
        return {split: _resolve_data_files(entry, path) for split, entry in files.items()}
    if isinstance(files, (list, tuple)):
        return [f for entry in files for f in _resolve_data_files(entry, path)]
    matches = expand(str(files))
    if not matches:
        root = data_root()
        raise FileNotFoundError(
            f"task file {path}: dataset_kwargs.data_files {str(files)!r} not found under the data root "
            f"({root if root else f'none: set {ENV_VAR}, or put the shipped data at ../shared/data'}) "
            "nor the working directory")
    return [str(m.resolve()) for m in matches]


class TaskSelection:
    """What ``--tasks`` names, resolved: specs for lm-eval (config dicts of our YAMLs, names of its
    built-in tasks) and the ``TaskManager`` that loads them."""

    def __init__(self, specs: list[str | dict[str, Any]], names: list[str], manager: TaskManager) -> None:
        self.specs, self.names, self.manager = specs, names, manager

    def load(self) -> dict[str, Any]:
        """lm-eval's task dict (``tasks``, ``groups``, ``group_map``; reads the datasets), built once
        and reusable by every :func:`run_harness` call; a failure is one line naming the task."""
        loaded: dict[str, Any] = {"tasks": {}, "groups": {}, "group_map": {}}
        for name, spec in zip(self.names, self.specs):
            try:
                with quiet_harness(logging.WARNING):
                    one = self.manager.load([spec])
                for key in loaded:
                    loaded[key].update(one.get(key, {}))
            except Exception as e:  # noqa: BLE001 - lm-eval/datasets errors, re-raised as one line
                first = str(e).splitlines()[0] if str(e) else ""
                if _is_network_error(e):
                    raise ValueError(f"task {name!r} needs the network to read its dataset and it is not reachable "
                                     f"({type(e).__name__}: {first[:200]})") from None
                raise ValueError(f"task {name!r}: lm-eval could not load it: {type(e).__name__}: {first[:300]}") from None
        return loaded


def _is_network_error(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return isinstance(e, ConnectionError) or any(w in text for w in ("offline", "connection", "resolve host",
                                                                     "couldn't reach", "network"))


def resolve_tasks(tasks: Sequence[str], include_paths: Sequence[str | Path] = ()) -> TaskSelection:
    """Resolve ``--tasks`` entries (see the module doc) without loading any dataset.

    Our YAMLs need no index of lm-eval's built-in task files (13,986 YAMLs in 0.4.13: seconds to index), so
    that index is read only when an entry is neither a file nor one of ours.
    """
    from lm_eval.tasks import TaskManager

    entries = [t.strip() for t in tasks if t and t.strip()]
    if not entries:
        raise ValueError("--tasks is empty: name at least one task (e.g. tatoeba_en_fr_mc, or a YAML path)")
    ours = local_task_files(include_paths)
    specs: list[str | dict[str, Any]] = []
    names: list[str] = []
    builtin: list[str] = []
    for entry in entries:
        path = Path(entry).expanduser()
        if entry.endswith((".yaml", ".yml")) or path.is_file():
            if not path.is_file():
                raise FileNotFoundError(f"task file {entry!r} does not exist")
            config = load_task_yaml(path)
        elif entry in ours:
            config = load_task_yaml(ours[entry])
        else:
            specs.append(entry)
            names.append(entry)
            builtin.append(entry)
            continue
        specs.append(config)
        names.append(config["task"])
    manager = TaskManager(include_defaults=bool(builtin), include_path=[str(p) for p in include_paths] or None)
    for name in builtin:
        _check_builtin(name, manager, ours)
    return TaskSelection(specs, names, manager)


def _check_builtin(name: str, manager: TaskManager, ours: dict[str, Path]) -> None:
    """Refuse an unknown name (with its close matches) or a hub task while the hub is off."""
    entry = manager.task_index.get(name)
    if entry is None:
        close = difflib.get_close_matches(name, sorted(set(ours) | set(manager.all_tasks)), n=5, cutoff=0.6)
        hint = f"close matches: {', '.join(close)}" if close else "no close match"
        raise ValueError(f"unknown task {name!r}; {hint} (ours: {', '.join(sorted(ours))}; all of lm-eval's: "
                         "`lm-eval ls tasks`; or pass a task YAML path)")
    if not hub_offline():
        return
    hub = sorted({p for cfg in _leaf_configs(name, manager) if (p := _hub_dataset(cfg))})
    if hub:
        raise ValueError(f"task {name!r} reads the hub dataset {hub[0]!r} and the hub is switched off here "
                         "(HF_DATASETS_OFFLINE/HF_HUB_OFFLINE): run it where the hub is reachable, or use a local "
                         "task YAML (configs/harness/)")


def _leaf_configs(name: str, manager: TaskManager, depth: int = 0) -> Iterator[dict[str, Any]]:
    """The index's configs of the tasks behind ``name`` (a task, or a group's/tag's members)."""
    from lm_eval.tasks._index import Kind

    entry = manager.task_index.get(name)
    if entry is None or depth > 8:
        return
    if entry.kind in (Kind.TASK, Kind.PY_TASK):
        if entry.cfg is not None:
            yield entry.cfg
        return
    # A tag's entry lists its member tasks in ``tags``; a group's YAML lists them under ``task``.
    members = sorted(entry.tags) if entry.kind == Kind.TAG else (entry.cfg or {}).get("task")
    for member in members if isinstance(members, list) else []:
        member_name = member.get("task") if isinstance(member, dict) else member
        if isinstance(member_name, str) and member_name != name:
            yield from _leaf_configs(member_name, manager, depth + 1)


def _hub_dataset(config: dict[str, Any]) -> str | None:
    path = config.get("dataset_path")
    if not isinstance(path, str) or path in LOCAL_BUILDERS or Path(path).expanduser().exists():
        return None
    return path


def wrap_model(model: Any, tokenizer: Any, kind: str, batch_size: int = 16, max_length: int | None = None,
               mixed_precision_dtype: Any = None) -> HFLM:
    """lm-eval's ``HFLM`` around ``model`` (an instance: no export step) and ``tokenizer``.

    Args:
        model: a Hugging Face causal LM or seq2seq model (a LoRA-adapted one included).
        tokenizer: its tokenizer.
        kind: "decoder" (causal backend) or "encoder_decoder" (seq2seq backend), as `load_pretrained` says.
        batch_size: requests per forward pass.
        max_length: context in tokens; None = the model's usable context (the trained length).
        mixed_precision_dtype: autocast dtype of the forward passes (None: the weights' own).
    """
    import torch
    from transformers import PreTrainedTokenizerBase

    backend = {"decoder": "causal", "encoder_decoder": "seq2seq"}.get(kind)
    what = f"{type(model).__name__} with {type(tokenizer).__name__}"
    if backend is None:
        raise ValueError(f"the harness cannot wrap {what}: model kind {kind!r} is neither a decoder nor an "
                         "encoder-decoder")
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise ValueError(f"the harness cannot wrap {what}: lm-eval needs a Hugging Face tokenizer")
    if not (isinstance(model, torch.nn.Module) and hasattr(model, "config") and hasattr(model, "device")):
        raise ValueError(f"the harness cannot wrap {what}: lm-eval needs a Hugging Face model (config, device)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_length is None:
        max_length = usable_context(model.config, tokenizer)[0]
    from lm_eval.models.huggingface import HFLM

    try:
        with quiet_harness():  # HFLM warns on every model instance ("many other model arguments ...")
            return HFLM(pretrained=model, tokenizer=tokenizer, backend=backend, batch_size=batch_size,
                        max_length=max_length, mixed_precision_dtype=mixed_precision_dtype,
                        softmax_dtype=torch.float32 if mixed_precision_dtype is not None else None)
    except (AssertionError, AttributeError, TypeError) as e:
        raise ValueError(f"the harness cannot wrap {what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                         ) from None


@contextmanager
def quiet_harness(level: int = logging.ERROR) -> Iterator[None]:
    """lm-eval's per-call info/warning lines off (they repeat at every in-loop evaluation)."""
    logger = logging.getLogger("lm_eval")
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def task_scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """task -> {metric: value}: lm-eval's ``"<metric>,<filter>"`` keys flattened (``acc``,
    ``acc_stderr``; a filter other than ``none`` stays in the name: ``exact_match/strict-match``);
    stderrs lm-eval could not compute ("N/A") and non-finite values are left out."""
    scores: dict[str, dict[str, float]] = {}
    for task, row in results.get("results", {}).items():
        flat: dict[str, float] = {}
        for key, value in row.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            if math.isfinite(float(value)):
                flat[metric if filt in ("", "none") else f"{metric}/{filt}"] = float(value)
        scores[task] = flat
    return scores


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Python's, numpy's and torch's global RNG states (CPU and every initialised CUDA device) as
    they were on entry, whatever the body draws or seeds: lm-eval seeds all three, and a training
    run that evaluated must draw the same dropout masks as one that did not (exact resume)."""
    import numpy as np
    import torch

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def run_harness(lm: Any, loaded: dict[str, Any], num_fewshot: int | None = None, limit: int | float | None = None,
                bootstrap_iters: int = 0, log_samples: bool = False, quiet: bool = False) -> dict[str, Any]:
    """lm-eval's ``evaluate`` on tasks loaded once (:meth:`TaskSelection.load`), set up as its
    ``simple_evaluate`` sets them up: ``num_fewshot`` overrides a task's default unless its YAML
    pins 0, few-shot draws seeded with lm-eval's default seed, and Python/numpy/torch seeded with its
    defaults (0, 1234, 1234) -- inside :func:`preserved_rng`, so the caller's RNG streams are untouched.
    ``simple_evaluate`` itself is not used: it reloads the tasks and collects environment information
    (``pip list``, ``nvidia-smi``: seconds) at every call, which an in-loop evaluation pays each time.

    ``quiet`` keeps lm-eval's warnings too (an in-loop evaluation would repeat the same ones, e.g.
    left-truncation of prompts longer than the context, at every call).

    Returns lm-eval's results dict (``results``, ``versions``, ``n-shot``, ``n-samples``, ``configs``,
    ``higher_is_better``, and ``samples`` when ``log_samples``).
    """
    import numpy as np
    import torch
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED
    from lm_eval.evaluator import evaluate

    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be > 0 (a count, or a fraction below 1), got {limit}")
    for task in loaded["tasks"].values():
        if num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    with preserved_rng(), quiet_harness(logging.ERROR if quiet else logging.WARNING):
        random.seed(DEFAULT_RANDOM_SEED)
        np.random.seed(DEFAULT_OTHER_SEED)
        torch.manual_seed(DEFAULT_OTHER_SEED)
        results = evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=bootstrap_iters,
                           log_samples=log_samples)
    if results is None:  # lm-eval returns None off rank 0; HFLM around an instance is always rank 0
        raise RuntimeError("lm-eval returned no results (not rank 0?)")
    return results
