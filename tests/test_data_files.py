"""common.data_files: which files a local entry names, which builder reads them, and what a failed
hub fallback says (the stages' own tests cover them end to end)."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest

from common.data_files import expand, find_local, infer_format, load_files, load_hub


@pytest.fixture
def root_and_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A data root holding d/a.jsonl, d/b.jsonl, d/.hidden and a cwd holding d/c.jsonl."""
    root, cwd = tmp_path / "root", tmp_path / "cwd"
    (root / "d").mkdir(parents=True)
    (cwd / "d").mkdir(parents=True)
    for name in ("b.jsonl", "a.jsonl", ".hidden"):
        (root / "d" / name).write_text("{}\n")
    (cwd / "d" / "c.jsonl").write_text("{}\n")
    monkeypatch.setenv("LMTRAIN_DATA_ROOT", str(root))
    monkeypatch.chdir(cwd)
    return root, cwd


def test_entries_resolve_under_the_data_root_before_the_cwd(root_and_cwd) -> None:
    root, cwd = root_and_cwd
    both = [root / "d" / "a.jsonl", root / "d" / "b.jsonl"]
    assert expand("d") == both  # a directory: its visible files, sorted
    assert expand("d/*.jsonl") == both  # the data root's matches; the cwd's d/c.jsonl is not mixed in
    assert expand("d/c*.jsonl") == [cwd / "d" / "c.jsonl"]  # nothing under the root: the cwd's
    assert expand("d/c.jsonl") == [Path("d/c.jsonl")]
    assert expand(str(root / "d" / "b.jsonl")) == [root / "d" / "b.jsonl"]
    assert expand("d/*.txt") == [] and expand("no/such.jsonl") == []


def test_a_local_copy_is_used_only_when_every_entry_matches(root_and_cwd) -> None:
    root, _ = root_and_cwd
    mapped = find_local({"x": "d/a.jsonl", "y": "d/b.jsonl"})
    assert mapped.found and list(mapped.matched) == ["x", "y"]
    assert mapped.files == [root / "d" / "a.jsonl", root / "d" / "b.jsonl"]
    partial = find_local(["d/a.jsonl", "d/nope.jsonl"])
    assert not partial.found and partial.missing == ["d/nope.jsonl"] and list(partial.matched) == ["d/a.jsonl"]
    none = find_local(None)
    assert not none.found and none.missing == [] and none.files == []
    assert find_local("d/*.jsonl").found


def test_format_from_extension_and_the_error_names_where() -> None:
    assert infer_format([Path("a.tsv"), Path("b.CSV")], "w") == "csv"
    assert infer_format([Path("a.jsonl"), Path("b.json")], "w") == "json"
    assert infer_format([Path("a.txt"), Path("b.md"), Path("c.text")], "w") == "text"
    assert infer_format([Path("a.parquet")], "w") == "parquet"
    with pytest.raises(ValueError, match=r"^task 'x' split 'train': cannot infer one format from \['a.txt', "
                                         r"'b.csv'\]; set `format` to one of \('csv', 'json', 'parquet', 'text'\)$"):
        infer_format([Path("a.txt"), Path("b.csv")], "task 'x' split 'train'")
    with pytest.raises(ValueError, match=r"^sources\[3\]: cannot infer one format from \['a.xml'\]; .*\('csv', 'x'\)"):
        infer_format([Path("a.xml")], "sources[3]", ("csv", "x"))


def test_tsv_is_read_with_a_tab_delimiter(tmp_path: Path) -> None:
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("en\tfr\nHello, you.\tBonjour, toi.\n", encoding="utf-8")  # commas inside the fields
    ds = load_files([tsv], "csv", cache_dir=str(tmp_path / "cache"))
    assert ds.column_names == ["en", "fr"] and ds[0] == {"en": "Hello, you.", "fr": "Bonjour, toi."}


def test_failed_hub_load_names_the_local_copy_and_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def offline(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("off")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"^sources\[0\]: local \['x'\] not found and hub dataset 'org/ds' "
                                         r"\(hub_config 'c', split 'train'\) failed to load: ConnectionError: off$"):
        load_hub("org/ds", "c", "train", "sources[0]", "local ['x'] not found", split_key="split", streaming=True)
    with pytest.raises(ValueError, match=r"\(hub_config None, hub_split 'test'\)"):
        load_hub("org/ds", None, "test", "task 't' split 'test'", "no local copy declared")
    assert calls == [(("org/ds", "c"), {"split": "train", "streaming": True}), (("org/ds", None), {"split": "test"})]
