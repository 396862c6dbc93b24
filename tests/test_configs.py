"""Every YAML under configs/ parses and type-checks against the class it configures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pretrain.cli import main as pretrain_cli
from pretrain.prepare import main as prepare_main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
ALL_YAML = sorted(CONFIGS.rglob("*.yaml"))


def test_there_are_configs_to_check() -> None:
    assert {p.parent.name for p in ALL_YAML} >= {"pretrain", "data", "trainer"}


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_parses(path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    kind = path.relative_to(CONFIGS).parts[0]
    if kind == "pretrain":
        run = lambda: pretrain_cli(["fit", "--config", str(path), "--print_config"])  # noqa: E731
    elif kind == "trainer":  # a trainer preset is layered over a model preset
        tiny = str(CONFIGS / "pretrain" / "gpt-tiny.yaml")
        run = lambda: pretrain_cli(["fit", "--config", tiny, "--config", str(path), "--print_config"])  # noqa: E731
    elif kind == "finetune":
        from finetune.cli import main as finetune_cli

        run = lambda: finetune_cli(["fit", "--config", str(path), "--print_config"])  # noqa: E731
    elif kind == "compare":  # not a LightningCLI config: parsed by `python -m finetune compare`
        check_compare_config(parse_compare_config(path, monkeypatch))
        return
    elif kind == "study":  # parsed by `python -m finetune study`; its variants and the configs it names too
        for quick in (False, True):
            check_study_config(parse_study_config(path, monkeypatch, quick), monkeypatch)
        return
    elif kind == "tasks":  # not a CLI config: a task is loaded (and its templates checked) by load_task
        from finetune.tasks import load_task

        assert load_task(path).name == path.stem
        return
    elif kind == "data":
        run = lambda: prepare_main(["--config", str(path), "--print_config"])  # noqa: E731
    elif kind == "harness":  # lm-evaluation-harness task files: resolved and built as `finetune harness` does
        from common.data_root import data_root
        from common.lm_harness import resolve_tasks

        if data_root() is None:
            pytest.skip("data root not found (the harness tasks read the shipped data)")
        selection = resolve_tasks([path.stem])  # by name, as the presets and --tasks name them
        assert selection.names == [path.stem]
        task = selection.load()["tasks"][path.stem]
        assert len(task.eval_docs) > 0
        return
    else:
        pytest.fail(f"no parser is registered for configs/{kind}/ — add one to this test")
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    assert capsys.readouterr().out.strip(), "--print_config printed nothing"


def parse_compare_config(path: Path, monkeypatch: pytest.MonkeyPatch):
    """The CompareConfig that `python -m finetune compare --config <path>` builds, through the same
    entry point and jsonargparse parser (types checked, unknown keys refused); the comparison itself,
    which would train, is replaced by a recorder."""
    import finetune.__main__ as entry
    import finetune.compare as compare_module

    parsed: list = []
    monkeypatch.setattr(compare_module, "compare", parsed.append)
    monkeypatch.setattr(sys, "argv", ["python -m finetune", "compare", "--config", str(path)])
    entry.main()
    assert len(parsed) == 1 and isinstance(parsed[0], compare_module.CompareConfig), parsed
    return parsed[0]


def check_compare_config(config) -> None:
    """What `compare` and each model's `finetune fit --model.scratch` would check before training
    (the parser has already refused unknown model options and bad choices: the archs are typed)."""
    from common.archs import GPT2Arch
    from finetune.tasks import load_task

    load_task(config.task)
    assert config.models, "compare: `models` is empty"
    unknown = sorted(set(config.model_options) - set(config.models))
    assert not unknown, f"model_options for models that are not in `models`: {unknown}"
    for name, arch in config.models.items():
        assert not isinstance(arch, GPT2Arch), name  # a translation comparison: seq2seq models


def parse_study_config(path: Path, monkeypatch: pytest.MonkeyPatch, quick: bool):
    """The StudyConfig `python -m finetune study --config <path> [--quick]` builds (the study itself
    replaced by a recorder), through the same entry point and parser."""
    import finetune.__main__ as entry
    import finetune.study as study_module

    parsed: list = []
    monkeypatch.setattr(study_module, "study", lambda cfg, command: parsed.append(cfg))
    monkeypatch.setattr(sys, "argv", ["python -m finetune", "study", "--config", str(path), *(["--quick"] if quick else [])])
    entry.main()
    assert len(parsed) == 1 and isinstance(parsed[0], study_module.StudyConfig), parsed
    return parsed[0]


def check_study_config(config, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its tasks load, its pretraining presets exist, and every comparison parses with the study's overrides."""
    import json

    from finetune.tasks import load_task

    for task in config.tasks:
        load_task(task)
    repo = CONFIGS.parent
    for name, model in config.models.items():
        assert model.pretrain is None or (repo / model.pretrain).is_file(), (name, model.pretrain)
    overrides = [a for k, v in config.compare_overrides.items()
                 for a in (f"--{k}", json.dumps(v) if isinstance(v, (list, dict)) else str(v))]
    for compare in config.compare:
        import finetune.__main__ as entry
        import finetune.compare as compare_module

        parsed: list = []
        monkeypatch.setattr(compare_module, "compare", parsed.append)
        monkeypatch.setattr(sys, "argv", ["python -m finetune", "compare", "--config", str(repo / compare), *overrides])
        entry.main()
        check_compare_config(parsed[0])


COMPARE_YAML = CONFIGS / "compare" / "translation_en_fr.yaml"


@pytest.mark.parametrize(("edit", "message"), [
    (lambda text: text.replace("max_steps: 100000", "max_steps: 100000\nmax_stpes: 3"), "'max_stpes' is not accepted"),
    (lambda text: text.replace("max_steps: 100000", "max_steps: many"), "max_steps"),
    # the model archs are typed: an unknown option or choice fails when the YAML is parsed
    (lambda text: text.replace("attention: bahdanau,", "atention: bahdanau,"), "'atention' is not accepted"),
    (lambda text: text.replace("attention: bahdanau,", "attention: bahdanu,"), "bahdanu"),
    (lambda text: text.replace("  transformer: {label_smoothing", "  transfomer: {label_smoothing"), "model_options names no model"),
    (lambda text: text.replace("label_smoothing: 0.1}", "label_smothing: 0.1}"), "unknown option(s) ['label_smothing']"),
])
def test_compare_parser_refuses_unknown_keys_and_bad_values(edit, message: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(edit(COMPARE_YAML.read_text()))
    assert bad.read_text() != COMPARE_YAML.read_text(), "the edit did not apply: update this test"
    with pytest.raises(SystemExit) as exit_info:
        parse_compare_config(bad, monkeypatch)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((CONFIGS / "pretrain").glob("*.yaml")), ids=lambda p: p.stem)
def test_gpt_presets_pretrain_at_their_full_context(path: Path) -> None:
    """Learned positions past the training block keep their random init: a preset trains every
    position it declares (issue 10: gpt-tiny declared 256 and trained 128)."""
    import yaml

    from common.archs import GPT2Arch

    config = yaml.safe_load(path.read_text())
    if config["model"]["class_path"].rsplit(".", 1)[-1] != "CausalLMSystem":
        return
    arch = GPT2Arch(**config["model"]["init_args"].get("arch", {}))
    assert config["data"]["block_size"] == arch.n_positions, (
        f"{path.name}: data.block_size {config['data']['block_size']} != n_positions {arch.n_positions}")
