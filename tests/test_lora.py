"""LoRA fine-tuning through peft (`finetune.adapters`), for a decoder (GPT-2) and an encoder-decoder
(T5) saved like hub checkpoints: only the adapters train and are checkpointed, an interrupted run
resumes exactly, the adapter exports for `PeftModel.from_pretrained` and merges into a plain model
with the same logits, `evaluate` reads the exported adapter, and each bad input is one clear error."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from common.export import probe_logits
from common.user_errors import report_user_errors
from finetune.cli import main as finetune_cli
from finetune.export import main as export_main
from tests.tiny_hf import save_tiny_model

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"
TASK = str(FIXTURES / "capitals.yaml")
QUIET = ["--trainer.logger", "false", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]
LORA = "{method: lora, r: 4, alpha: 8, dropout: 0.1, target_modules: auto}"
AUTO = {"gpt2": AutoModelForCausalLM, "t5": AutoModelForSeq2SeqLM}
FAMILIES = ["gpt2", "t5"]


def _fit_args(model: Path, run: Path) -> list[str]:
    return ["--model.init", str(model), "--data.task", TASK, "--data.val_split", "test", "--data.batch_size", "2",
            "--data.max_val_examples", "2", "--model.max_new_tokens", "2", "--model.lr", "1e-3",
            "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--attention_plots.n_examples", "0",
            "--trainer.default_root_dir", str(run)]


def _fit(model: Path, run: Path, *extra: str):
    return finetune_cli(["fit", *_fit_args(model, run), *QUIET, *extra])


class Runs:
    """One 4-step LoRA fit and one full fit per family, shared by the tests that only read them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.models = {family: save_tiny_model(family, root / "models" / family) for family in FAMILIES}
        self.fits: dict[tuple[str, bool], object] = {}
        self.logs: dict[str, list[str]] = {}

    def fit(self, family: str, lora: bool = True):
        key = (family, lora)
        if key not in self.fits:
            handler = _Collect()
            logging.getLogger("lightning.pytorch").addHandler(handler)
            try:
                self.fits[key] = _fit(self.models[family], self.root / f"{family}-{'lora' if lora else 'full'}",
                                      *(["--model.peft", LORA] if lora else []))
            finally:
                logging.getLogger("lightning.pytorch").removeHandler(handler)
            self.logs[family if lora else family + "-full"] = handler.lines
        return self.fits[key]

    def run_dir(self, family: str, lora: bool = True) -> Path:
        return Path(self.fit(family, lora).trainer.default_root_dir)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMTRAIN_DATA_ROOT", str(FIXTURES))
        yield Runs(tmp_path_factory.mktemp("lora"))


def _ids(family: str) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    return {"input_ids": ids, **({"decoder_input_ids": ids} if family == "t5" else {})}


# ---- fit ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trains_only_the_adapters_and_checkpoints_only_them(runs: Runs, family: str) -> None:
    fit = runs.fit(family)
    model = fit.model.model
    base = AUTO[family].from_pretrained(runs.models[family])
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable), sorted(trainable)[:5]
    # The family's default targets, each adapted in every layer that has it.
    expected_targets = {"gpt2": {"c_attn", "c_proj", "c_fc"}, "t5": {"q", "k", "v", "o", "wi", "wo"}}[family]
    assert {n.split(".lora_")[0].rpartition(".")[2] for n in trainable} == expected_targets
    # The base is untouched; every lora_B (initialised to zero) has moved.
    base_state = base.state_dict()
    for name, p in model.get_base_model().state_dict().items():
        if ".lora_" not in name:
            assert torch.equal(p, base_state[name.replace(".base_layer", "")]), name
    assert all(p.abs().sum() > 0 for n, p in trainable.items() if ".lora_B." in n)

    # The log says how many train: r * (in + out) per adapted layer, of all the parameters.
    r = 4
    adapted = [m for n, m in base.named_modules() if n.rpartition(".")[2] in expected_targets]
    n_train = sum(r * (m.weight.shape[0] + m.weight.shape[1]) for m in adapted)
    n_total = sum(p.numel() for p in base.parameters()) + n_train
    line = next(line for line in runs.logs[family] if line.startswith("peft lora:"))
    assert line.startswith(f"peft lora: {n_train:,} of {n_total:,} parameters train ({100 * n_train / n_total:.2f}%)")

    # Checkpoints hold the adapter weights only (with their optimizer state): much smaller than a full one.
    ckpt = runs.run_dir(family) / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    assert set(state["state_dict"]) == {"model." + n for n in trainable}
    adapter = state["lmtrain"]["adapter"]
    assert adapter["base"] == str(runs.models[family].resolve()) and adapter["r"] == r
    full = runs.run_dir(family, lora=False) / "checkpoints" / "last.ckpt"
    full_state = torch.load(full, weights_only=True)

    def tensor_bytes(checkpoint: dict) -> int:  # weights + Adam moments
        moments = [t for s in checkpoint["optimizer_states"][0]["state"].values() for k, t in s.items() if k != "step"]
        return sum(t.numel() * t.element_size() for t in [*checkpoint["state_dict"].values(), *moments])

    assert tensor_bytes(state) == 3 * 4 * n_train  # fp32 adapter weights and two moments
    assert tensor_bytes(full_state) > 3 * 4 * (n_total - n_train) * 0.9  # (tied weights are stored once)
    # On disk (tokenizer files, RNG states and per-tensor overhead weigh a lot at this tiny size):
    assert ckpt.stat().st_size < full.stat().st_size / 2, (ckpt.stat().st_size, full.stat().st_size)


@pytest.mark.parametrize("family", FAMILIES)
def test_interrupted_lora_run_resumes_exactly(runs: Runs, family: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted after step 2 and resumed with --ckpt_path last, a LoRA run rebuilds the base from
    model.init, loads the adapter, its optimizer state, RNG (adapter dropout) and data position, and
    ends with the weights of the uninterrupted run."""
    monkeypatch.setenv("LMTRAIN_DATA_ROOT", str(FIXTURES))
    straight = runs.fit(family).model.model.state_dict()
    stop = tmp_path / "stop.yaml"
    stop.write_text("trainer:\n  callbacks:\n    - class_path: tests.tiny_run.InterruptAtStep\n"
                    "      init_args: {step: 2}\n")
    with pytest.raises(SystemExit):  # Lightning shuts down gracefully on Ctrl-C, then exits 1
        _fit(runs.models[family], tmp_path / "resumed", "--model.peft", LORA, "--config", str(stop))
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    resumed = _fit(runs.models[family], tmp_path / "resumed", "--model.peft", LORA, "--ckpt_path", "last")
    assert resumed.trainer.global_step == 4
    weights = resumed.model.model.state_dict()
    assert weights.keys() == straight.keys()
    assert [k for k in straight if not torch.equal(straight[k], weights[k])] == []


# ---- export ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_exported_adapter_loads_with_peft_and_merges_into_a_plain_model(runs: Runs, family: str,
                                                                          tmp_path: Path) -> None:
    from peft import PeftModel

    live = runs.fit(family).model.model.eval()
    ckpt = runs.run_dir(family) / "checkpoints" / "last.ckpt"
    with torch.no_grad():
        expected = live(**_ids(family)).logits

    export_main([str(ckpt), str(tmp_path / "adapter")])
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(runs.models[family].resolve())
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(AUTO[family].from_pretrained(config["base_model_name_or_path"]),
                                         tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**_ids(family)).logits, expected)

    export_main([str(ckpt), str(tmp_path / "merged"), "--merge", "true"])
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AUTO[family].from_pretrained(tmp_path / "merged").eval()  # a plain model: no peft involved
    base = AUTO[family].from_pretrained(runs.models[family])
    assert merged.state_dict().keys() == base.state_dict().keys()
    with torch.no_grad():
        actual = merged(**_ids(family)).logits
        assert not torch.allclose(base(**_ids(family)).logits, expected, atol=1e-5)  # the adapter matters
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_merge_of_a_full_checkpoint_is_one_error_naming_the_option(runs: Runs, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    full = runs.run_dir("gpt2", lora=False) / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit):
        report_user_errors(lambda: export_main([str(full), str(tmp_path / "out"), "--merge", "true"]))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--merge" in errors[0] and "holds no adapter" in errors[0], errors
    assert not (tmp_path / "out").exists()


# ---- evaluate -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_evaluate_reads_an_exported_adapter_directory(runs: Runs, family: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMTRAIN_DATA_ROOT", str(FIXTURES))
    ckpt = runs.run_dir(family) / "checkpoints" / "last.ckpt"
    export_main([str(ckpt), str(tmp_path / "adapter")])

    def evaluate(init: Path, run: str):
        return finetune_cli(["evaluate", "--model.init", str(init), "--data.task", TASK, "--data.shots", "0",
                             "--model.max_new_tokens", "4", "--trainer.default_root_dir", str(tmp_path / run), *QUIET])

    from_dir = evaluate(tmp_path / "adapter", "from-dir")
    model = from_dir.model.model
    assert type(model).__name__.startswith("PeftModel")
    trained = runs.fit(family).model.model.state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)
    # The same model as the checkpoint it was exported from, so the same predictions.
    from_ckpt = evaluate(ckpt, "from-ckpt")
    assert from_dir.results["n_prompts"] == 3
    assert from_dir.results["predictions"] == from_ckpt.results["predictions"]


def test_fit_from_an_exported_adapter_continues_it(runs: Runs, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """--model.init <adapter dir> without model.peft trains that adapter on (its base still frozen), and
    the new run's checkpoints name the original base; adding a second adapter is refused."""
    monkeypatch.setenv("LMTRAIN_DATA_ROOT", str(FIXTURES))
    export_main([str(runs.run_dir("gpt2") / "checkpoints" / "last.ckpt"), str(tmp_path / "adapter")])
    start = runs.fit("gpt2").model.model.state_dict()
    fit = _fit(tmp_path / "adapter", tmp_path / "run", "--trainer.max_steps", "2")
    trained = fit.model.model.state_dict()
    moved = {k for k in start if not torch.equal(start[k], trained[k])}
    assert moved and all(".lora_" in k for k in moved)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["lmtrain"]["adapter"]["base"] == str(runs.models["gpt2"].resolve())
    assert all(".lora_" in k for k in state["state_dict"])
    with pytest.raises(ValueError, match="already holds an adapter"):
        _fit(tmp_path / "adapter", tmp_path / "run2", "--model.peft", LORA)


def test_lora_on_our_rnn_adapts_its_linear_layers_and_keeps_the_cells_frozen(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Our RNNs are no known family: `auto` adapts every linear layer but the output layer; peft has
    no LoRA for GRU/LSTM cells, so those stay frozen like the rest of the base."""
    monkeypatch.setenv("LMTRAIN_DATA_ROOT", str(FIXTURES))
    model_dir = save_tiny_model("rnn", tmp_path / "rnn")
    fit = _fit(model_dir, tmp_path / "run", "--model.peft", LORA)
    assert fit.trainer.global_step == 4
    model = fit.model.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".lora_")[0].rpartition(".")[2] for n in trainable} == {
        "bridge_hidden", "bridge_outputs", "key_layer", "query_layer", "energy_layer", "pre_output"}
    base = AutoModelForSeq2SeqLM.from_pretrained(model_dir).state_dict()
    tuned = model.get_base_model().state_dict()
    cells = [k for k in base if ".rnn." in k]  # encoder.rnn.weight_ih_l0, ...
    assert cells and all(torch.equal(tuned[k], base[k]) for k in cells)  # the GRU cells did not move
    assert all(tuned[k].abs().sum() > 0 for k in tuned if ".lora_B." in k)


# ---- targets --------------------------------------------------------------------------------------
def _model(model_type: str, **options):
    from transformers import AutoModelForSeq2SeqLM as Seq2Seq

    import finetune.rnn  # noqa: F401  (registers rnn_seq2seq)

    small = {"gpt2": dict(n_embd=16, n_layer=1, n_head=2, vocab_size=50),
             "t5": dict(d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2, vocab_size=50),
             **{name: dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=50)
                for name in ("bart", "marian")},
             "rnn_seq2seq": dict(vocab_size=50, embedding_dim=16, hidden_size=16)}[model_type]
    config = AutoConfig.for_model(model_type, **small, **options)
    return (AutoModelForCausalLM if model_type == "gpt2" else Seq2Seq).from_config(config)


@pytest.mark.parametrize(("model_type", "options", "expected"), [
    ("gpt2", {}, ["c_attn", "c_proj", "c_fc"]),
    ("t5", {}, ["q", "k", "v", "o", "wi", "wo"]),
    ("t5", {"feed_forward_proj": "gated-gelu"}, ["q", "k", "v", "o", "wo", "wi_0", "wi_1"]),
    ("bart", {}, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    ("marian", {"pad_token_id": 0, "decoder_start_token_id": 0}, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    ("rnn_seq2seq", {"attention": "bahdanau"}, None),  # not a known family: every linear layer but the head
])
def test_auto_targets_per_family(model_type: str, options: dict, expected: list[str] | None) -> None:
    from finetune.adapters import LINEAR_LAYERS, PeftOptions, add_adapter, resolve_targets

    model = _model(model_type, **options)
    targets = resolve_targets(model, PeftOptions())
    head = model.get_output_embeddings()
    if expected is None:  # our RNN: its attention and bridge layers, never the output layer
        expected = sorted({n.rpartition(".")[2] for n, m in model.named_modules()
                           if isinstance(m, LINEAR_LAYERS) and m is not head})
        assert expected and "output" not in expected
    assert targets == expected
    adapted = add_adapter(model, PeftOptions(r=2), base="test")
    assert not any(".lora_" in n for n, _ in head.named_parameters())
    assert any(p.requires_grad for p in adapted.parameters())
    assert not any(p.requires_grad for n, p in adapted.named_parameters() if ".lora_" not in n)


# ---- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "message"), [
    (["--model.peft", "{method: dora}"], "model.peft.method='dora' is unknown; known methods: lora, qlora"),
    (["--model.peft", "{target_modules: [q_proj, c_attn]}"],
     "model.peft.target_modules: no linear layer of this gpt2 model is named q_proj (the LM head is never adapted); "
     "its linear layers are named: c_attn, c_fc, c_proj"),
    (["--model.peft", "{target_modules: [lm_head]}"], "no linear layer of this gpt2 model is named lm_head"),
    pytest.param(["--model.peft", "{method: qlora}"], "model.peft.method=qlora: QLoRA needs CUDA + bitsandbytes",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for CPU machines")),
    (["--model.peft", "{r: 0}"], "model.peft.r must be >= 1"),
    (["--model.random_init", "true", "--model.peft", "{}"], "model.peft with model.random_init"),
], ids=["method", "targets", "head", "qlora-cpu", "rank", "random-init"])
def test_bad_peft_options_are_one_error_naming_the_option(runs: Runs, args: list[str], message: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        report_user_errors(lambda: _fit(runs.models["gpt2"], tmp_path / "run", *args))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors


def test_peft_with_a_model_from_scratch_is_refused() -> None:
    from finetune.adapters import PeftOptions
    from finetune.system import FinetuneSystem

    with pytest.raises(ValueError, match=r"model.peft needs model.init: adapters train on top of pretrained weights"):
        FinetuneSystem(scratch={"model_type": "rnn_seq2seq"}, peft=PeftOptions())


def test_adapter_on_a_changed_base_is_refused(runs: Runs, tmp_path: Path) -> None:
    """The checkpoint names its base; if those weights changed, the adapter means nothing on them."""
    from finetune.pretrained import load_pretrained

    ckpt = runs.run_dir("gpt2") / "checkpoints" / "last.ckpt"
    assert type(load_pretrained(str(ckpt)).model).__name__ == "PeftModelForCausalLM"  # the original base loads
    changed = save_tiny_model("gpt2", tmp_path / "changed")  # same architecture and tokenizer, other weights
    state = torch.load(ckpt, weights_only=True)
    state["lmtrain"]["adapter"]["base"] = str(changed)
    torch.save(state, tmp_path / "moved.ckpt")
    with pytest.raises(ValueError, match=r"the adapter was trained on base .* but that base now has weights"):
        load_pretrained(str(tmp_path / "moved.ckpt"))


def test_resuming_a_lora_checkpoint_as_a_full_run_is_refused(runs: Runs, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs.run_dir("gpt2") / "checkpoints", run / "checkpoints")
    with pytest.raises(SystemExit):
        report_user_errors(lambda: _fit(runs.models["gpt2"], run, "--ckpt_path", "last",
                                        "--trainer.max_steps", "6"))
    err = capsys.readouterr().err
    assert re.search(r"error: .*holds a LoRA adapter without its base weights, but this run fine-tunes every "
                     r"weight: resume with the run's model.peft", err), err


# ---- two processes --------------------------------------------------------------------------------
@pytest.mark.integration  # 3 launches of 2 processes each (~20 s a launch)
@pytest.mark.slow  # ~60 s each: under -m slow to keep CI near 10 minutes (the default suite covers LoRA in one process)
@pytest.mark.parametrize("preset", ["ddp-cpu", "deepspeed-zero2-cpu"])
def test_lora_on_two_processes_checkpoints_the_adapter_and_resumes_exactly(runs: Runs, preset: str,
                                                                           tmp_path: Path) -> None:
    """Under DDP and DeepSpeed ZeRO-2 (2 CPU processes): the ranks' adapters stay equal, checkpoints
    hold the adapter weights only (ZeRO: not even a tied embedding), a SIGKILLed run resumes to the
    uninterrupted run's weights, and the adapter exported from the checkpoint gives the live logits."""
    from peft import PeftModel

    from common.checkpoints import is_zero_checkpoint, load_zero_file, model_states_file
    from tests.distributed_probe import probe_logits as live_probe
    from tests.test_distributed import PRESETS, _fit as fit_processes, _kill_yaml, _probe_yaml, _weights, _why

    model = runs.models["gpt2"]

    def fit(run: Path, *extra: str):
        return fit_processes(*_fit_args(model, run), "--model.peft", LORA, "--trainer.logger", "false",
                             "--config", str(PRESETS / f"{preset}.yaml"), *extra, stage="finetune",
                             LMTRAIN_DATA_ROOT=str(FIXTURES))

    straight = tmp_path / "straight"
    result = fit(straight, "--config", str(_probe_yaml(tmp_path, straight / "probe")))
    assert result.returncode == 0, _why(result)
    rank0, rank1 = (torch.load(straight / "probe" / f"probe-rank{r}.pt", weights_only=True) for r in range(2))
    assert rank0["world_size"] == 2 and rank0["global_step"] == 4
    assert all(b0 != b1 for b0, b1 in zip(rank0["batches"], rank1["batches"])), "ranks trained on the same batch"
    assert torch.equal(rank0["logits"], rank1["logits"])

    last = straight / "checkpoints" / "last.ckpt"
    assert is_zero_checkpoint(last) == preset.startswith("deepspeed")
    expected = _weights(last)
    assert len(expected) == 16 and all(".lora_A." in k or ".lora_B." in k for k in expected), sorted(expected)
    if is_zero_checkpoint(last):  # the module weights DeepSpeed writes itself
        assert set(load_zero_file(model_states_file(last))["module"]) == set(expected)

    killed = tmp_path / "killed"
    first = fit(killed, "--config", str(_kill_yaml(tmp_path, 3)))
    assert first.returncode == -9, _why(first)
    resumed = fit(killed, "--ckpt_path", "last")
    assert resumed.returncode == 0, _why(resumed)
    actual = _weights(killed / "checkpoints" / "last.ckpt")
    assert actual.keys() == expected.keys()
    assert [k for k in expected if not torch.equal(expected[k], actual[k])] == []

    export_main([str(last), str(tmp_path / "adapter")])
    exported = PeftModel.from_pretrained(AUTO["gpt2"].from_pretrained(model), tmp_path / "adapter").eval()
    assert torch.equal(live_probe(exported), rank0["logits"])
