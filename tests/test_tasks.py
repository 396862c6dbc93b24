"""Task YAMLs: every shipped task loads, its local splits normalize correctly, a YAML-only user task
works end to end, the hub path maps nested columns (without network), and bad input names its cause."""

from __future__ import annotations

import shutil
from pathlib import Path

import datasets
import pytest
import yaml

from finetune.tasks import TASKS_DIR, TaskConfig, load_split, load_task, task_from_dict

SHIPPED = sorted(TASKS_DIR.glob("*.yaml"))
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tasks"
NO_HUB_COPY = {"multi30k_en_fr", "multi30k_fr_en"}  # the hub's Multi30k has no French


def _local_splits(task: TaskConfig) -> list[str]:
    return [name for name, sp in task.splits.items() if sp.local is not None]


def test_the_expected_tasks_are_shipped() -> None:
    assert {p.stem for p in SHIPPED} >= {
        "tatoeba_en_fr", "tatoeba_fr_en", "multi30k_en_de", "multi30k_de_en", "multi30k_en_fr", "multi30k_fr_en",
        "dialogsum", "samsum", "xsum", "cnn_dailymail", "squad"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_task_parses(path: Path) -> None:
    task = load_task(path.stem)
    assert task == load_task(path)
    assert task.name == path.stem
    assert path.read_text().startswith("#"), "each task YAML starts with a comment describing the data"
    assert set(task.templates) == {"decoder", "encoder_decoder"}
    for kind in task.templates:
        task.template(kind)  # builds a PromptTemplate
    pool = task.few_shot_split
    for split in pool if isinstance(pool, dict) else [s for s in task.splits if s != pool]:
        assert task.few_shot_split_for(split) in task.splits
        assert task.few_shot_split_for(split) != split, "demonstrations must not come from the evaluated split"
    if task.name == "reverse":  # generated: no files, no hub
        assert task.format == "reverse_sequence" and task.hub is None
        assert all(sp.generate and sp.local is None and sp.hub_split is None for sp in task.splits.values())
    elif task.name in NO_HUB_COPY:  # local only: every split must have its local copy
        assert task.hub is None
        assert all(sp.local is not None and sp.hub_split is None for sp in task.splits.values())
    else:  # every other real dataset names its hub copy and uses it for some split
        assert task.hub and any(sp.hub_split for sp in task.splits.values())


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_local_splits_load(path: Path, data_root: Path) -> None:
    task = load_task(path)
    for split in _local_splits(task):
        ds = load_split(task, split, max_examples=8)
        assert len(ds) == 8, split
        assert ds.column_names == ["id", "source", "target", "references", *task.extra_fields]
        for row in ds:
            assert row["source"] and row["target"] and row["references"], (split, row)
            assert row["target"] == row["references"][0]
        assert len(set(ds["id"])) == 8


def _count_words(text: str) -> int:
    return len(text.split())


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_templates_render_real_rows_for_both_model_kinds(path: Path, data_root: Path) -> None:
    """Each task's decoder and encoder-decoder templates on real test rows, with a demonstration
    from the task's pool, assembled as evaluate assembles them (finetune.few_shot.build_prompt)."""
    from finetune.few_shot import build_prompt

    task = load_task(path)
    rows = list(load_split(task, "test", max_examples=2))
    pool = list(load_split(task, task.few_shot_split_for("test"), max_examples=2))
    for kind in ("decoder", "encoder_decoder"):
        template = task.template(kind)
        for row in rows:
            prompt, completion = template.render_prompt(row), template.render_completion(row)
            assert prompt.strip() and completion.strip() and row["target"] in completion, (kind, prompt, completion)
            built = build_prompt(template, row, pool[:1], _count_words, max_tokens=10**6, long_field=task.long_field)
            demo = template.render_prompt(pool[0]) + template.render_completion(pool[0])
            assert built.n_shots == 1 and not built.truncated, (kind, built)
            assert built.text.endswith(prompt) and demo.strip() in built.text, (kind, built.text)


def test_row_counts_of_local_copies(data_root: Path) -> None:
    assert len(load_split(load_task("tatoeba_en_fr"), "validation")) == 2000
    assert len(load_split(load_task("multi30k_en_de"), "validation")) == 1014
    squad = load_task("squad")
    parts = {s: load_split(squad, s) for s in ("validation", "test")}
    assert {s: len(d) for s, d in parts.items()} == {"validation": 8502, "test": 1436}  # 9,938 questions
    # Few-shot pool = the other part, and no article is in both parts.
    assert squad.few_shot_split_for("validation") == "test" and squad.few_shot_split_for("test") == "validation"
    assert not set(parts["validation"]["title"]) & set(parts["test"]["title"])
    assert all(len(refs) >= 1 for refs in parts["test"]["references"])
    test = load_split(load_task("dialogsum"), "test")
    assert len(test) == 400 and all(len(refs) == 3 for refs in test["references"])
    # XSum: the demonstration pool is carved out of the only local file without overlap.
    xsum = load_task("xsum")
    demos, xtest = load_split(xsum, "demos"), load_split(xsum, "test")
    assert (len(demos), len(xtest)) == (50, 850) and not set(demos["id"]) & set(xtest["id"])


def test_max_examples_is_a_seeded_subset_in_file_order(data_root: Path) -> None:
    task = load_task("multi30k_en_fr")
    full = load_split(task, "validation")
    a, b = (load_split(task, "validation", max_examples=20, seed=s) for s in (0, 1))
    assert a["id"] == load_split(task, "validation", max_examples=20, seed=0)["id"]
    assert a["id"] != b["id"]
    index = [int(i.split("-")[1]) for i in a["id"]]
    assert index == sorted(index)  # file order kept; ids are row indices of the whole split
    assert a["source"] == [full["source"][i] for i in index]
    assert len(load_split(task, "validation", max_examples=5000)) == 1014


@pytest.fixture
def fixture_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data root holding a copy of the fixture files (tests may edit the copy)."""
    root = tmp_path / "root"
    shutil.copytree(FIXTURES, root)
    monkeypatch.setenv("LMTRAIN_DATA_ROOT", str(root))
    return root


def _fixture_dict(**changes) -> dict:
    data = yaml.safe_load((FIXTURES / "capitals.yaml").read_text())
    data.update(changes)
    return data


def test_user_task_from_yaml_only(fixture_root: Path) -> None:
    task = load_task(fixture_root / "capitals.yaml")
    assert task.metric == "squad"  # default for kind qa
    train = load_split(task, "train")
    assert train["id"] == ["q1", "q2", "q3", "q4", "q5"]
    assert train[0] == {"id": "q1", "source": "What is the capital of France?", "target": "Paris",
                        "references": ["Paris", "Paris, France"], "topic": "geography"}
    assert train["references"][2] == ["Tokyo"]  # empty alt_answer is not a reference
    test = load_split(task, "test")
    assert test["id"] == ["q3", "q4", "q5"]  # rows "2:"
    assert task.template("encoder_decoder").render_prompt(test[2]) == \
        "question: Which river flows through Vienna? topic: rivers"


class _FakeHub:
    """Stands in for ``datasets.load_dataset``: records its arguments, returns nested rows."""

    def __init__(self, data: dict) -> None:
        self.calls: list[tuple[tuple, dict]] = []
        self.data = data

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return datasets.Dataset.from_dict(self.data)


def test_hub_path_maps_dotted_columns(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LMTRAIN_DATA_ROOT", str(tmp_path))  # no local copy: the hub is used
    fake = _FakeHub({"translation": [{"en": "Hello.", "fr": "Bonjour."}, {"en": "Thanks.", "fr": "Merci."},
                                     {"en": "Yes.", "fr": "Oui."}]})
    monkeypatch.setattr(datasets, "load_dataset", fake)
    ds = load_split(load_task("tatoeba_en_fr"), "validation", max_examples=2, seed=3)
    assert fake.calls == [(("wmt/wmt14", "fr-en"), {"split": "validation"})]
    assert len(ds) == 2
    for row in ds:
        assert {"Hello.": "Bonjour.", "Thanks.": "Merci.", "Yes.": "Oui."}[row["source"]] == row["target"]
        assert row["references"] == [row["target"]] and row["id"].startswith("validation-")


def test_hub_path_list_answers_give_target_and_references(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LMTRAIN_DATA_ROOT", str(tmp_path))
    fake = _FakeHub({"id": ["a"], "title": ["T"], "context": ["Paris is in France."], "question": ["Where is Paris? "],
                     "answers": [{"text": ["France", "in France"], "answer_start": [12, 9]}]})
    monkeypatch.setattr(datasets, "load_dataset", fake)
    row = load_split(load_task("squad"), "validation")[0]
    assert fake.calls == [(("rajpurkar/squad", None), {"split": "validation"})]
    assert row == {"id": "a", "source": "Where is Paris?", "target": "France", "references": ["France", "in France"],
                   "question": "Where is Paris? ", "context": "Paris is in France.", "title": "T"}


def test_hub_failure_names_local_and_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LMTRAIN_DATA_ROOT", str(tmp_path))

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"local \['summarization/xsum/test_subset.jsonl'\] not found.*"
                                         r"'EdinburghNLP/xsum'.*hub_split 'test'.*no network"):
        load_split(load_task("xsum"), "test")
    with pytest.raises(FileNotFoundError, match="no hub equivalent"):
        load_split(load_task("multi30k_en_fr"), "test")


def test_missing_column_names_column_file_and_available(fixture_root: Path) -> None:
    task = task_from_dict(_fixture_dict(columns={"id": "qid", "source": "question", "target": "answr"}))
    with pytest.raises(ValueError, match=r"column 'answr' \(columns.target\) not found.*") as err:
        load_split(task, "train")
    assert "capitals.csv" in str(err.value)
    assert "['qid', 'question', 'answer', 'alt_answer', 'topic']" in str(err.value)


def test_unknown_split_names_task_and_splits(fixture_root: Path) -> None:
    with pytest.raises(ValueError, match=r"task 'capitals': unknown split 'validation'; available splits: "
                                         r"\['train', 'test'\]"):
        load_split(load_task(fixture_root / "capitals.yaml"), "validation")


def test_unknown_and_missing_yaml_keys(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_fixture_dict(colums={"source": "q"})))
    with pytest.raises(ValueError, match=r"bad.yaml: unknown key\(s\) \['colums'\]"):
        load_task(bad)
    bad.write_text(yaml.safe_dump(_fixture_dict(splits={"train": {"local": "x.csv", "hubsplit": "train"}})))
    with pytest.raises(ValueError, match=r"splits.train: unknown key\(s\) \['hubsplit'\]"):
        load_task(bad)
    data = _fixture_dict()
    del data["type"]
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=r"bad.yaml: missing required key\(s\) \['type'\]"):
        load_task(bad)
    data["kind"] = "qa"  # the key's name before it was told apart from the model's kind
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=r"bad.yaml: the task key `kind` is now `type`"):
        load_task(bad)
    with pytest.raises(ValueError, match=r"metric='bleu'"):
        task_from_dict(_fixture_dict(metric="bleu"))
    with pytest.raises(FileNotFoundError, match=r"unknown task 'no_such_task'.*shipped tasks: \[.*'squad'"):
        load_task("no_such_task")


def test_empty_file_and_empty_split(fixture_root: Path) -> None:
    (fixture_root / "empty.csv").write_text("")
    task = task_from_dict(_fixture_dict(splits={"train": {"local": "empty.csv"}}))
    with pytest.raises(ValueError, match=r"split 'train': empty file\(s\) \[.*empty.csv'\]"):
        load_split(task, "train")
    (fixture_root / "header.csv").write_text("qid,question,answer,alt_answer,topic\n")
    task = task_from_dict(_fixture_dict(splits={"train": {"local": "header.csv"}}))
    with pytest.raises(ValueError, match=r"split 'train': \[.*header.csv'\] hold no rows"):
        load_split(task, "train")
    task = task_from_dict(_fixture_dict(splits={"test": {"local": "capitals.csv", "rows": "10:"}}))
    with pytest.raises(ValueError, match=r"split 'test' \(file\(s\) .*capitals.csv'\]\): the split has no rows"):
        load_split(task, "test")


def test_template_errors_name_the_template_and_field() -> None:
    templates = {"decoder": {"prompt": "Q: {{ questoin }}\nA:"}}
    with pytest.raises(ValueError, match=r"templates.decoder: prompt template .* uses field 'questoin'"):
        task_from_dict(_fixture_dict(templates=templates))
    with pytest.raises(ValueError, match=r"templates.decoder: unknown key\(s\) \['stop_at'\]"):
        task_from_dict(_fixture_dict(templates={"decoder": {"prompt": "{{ source }}", "stop_at": ["\n"]}}))
    with pytest.raises(ValueError, match=r"templates.gpt: unknown model kind"):
        task_from_dict(_fixture_dict(templates={"gpt": {"prompt": "{{ source }}"}}))
