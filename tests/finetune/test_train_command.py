"""``lora-lab train``: it learns, it reports bad data by line, it stops and resumes exactly, it runs on 2 processes.

Most runs use ``--pretrain-steps 0`` (the tiny Llama as initialised, cached in
a temporary folder): they test the machinery, not the learning. The one test
that checks learning pre-trains the base for 200 steps (about 8 s).
"""

import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from lora_lab.cli import main
from lora_lab.data import collate as collate_products
from lora_lab.data import generate_products, get_tokenizer
from lora_lab.finetune import command as training_run
from lora_lab.finetune.adapters import CONFIG_NAME, WEIGHTS_NAME, load_adapter
from lora_lab.finetune.command import optimizer_step
from lora_lab.finetune.schedule import lr_multiplier
from lora_lab.model import apply_qlora, tiny_llama
from lora_lab.train import training_step

PNG = b"\x89PNG\r\n\x1a\n"
QUICK = ["--pretrain-steps", "0", "--eval-size", "8", "--batch-size", "4"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _cache(cache_dir, monkeypatch):
    monkeypatch.setenv("LORA_LAB_CACHE", str(cache_dir))


def _metrics(out):
    return json.loads((out / "metrics.json").read_text())


def _adapter(out):
    from safetensors.torch import load_file

    return load_file(out / "adapter" / WEIGHTS_NAME)


def test_training_lowers_the_price_error_and_writes_the_adapter_charts_and_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--pretrain-steps", "200", "--steps", "40", "--eval-size", "100", "--out", str(out)]) == 0
    metrics = _metrics(out)
    before, after = metrics["before"], metrics["after"]
    # Measured: loss 4.08 -> 3.74, mean error $62.9 -> $58.4, within 20% 27% -> 35% (seed 0, 100 held-out prompts).
    assert after["loss"] < before["loss"] - 0.2
    assert after["mae"] < before["mae"] and after["within_20pct"] > before["within_20pct"]
    assert metrics["steps_done"] == 40 and len(metrics["train_loss"]) == len(metrics["lr"]) == 40
    assert [e["step"] for e in metrics["evals"]] == [0, 6, 12, 18, 24, 30, 36, 40]
    assert len(metrics["held_out_prices"]["after"]) == 100
    assert (out / "loss.png").read_bytes()[:8] == PNG and (out / "prices.png").read_bytes()[:8] == PNG
    config = json.loads((out / "adapter" / CONFIG_NAME).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 8, 16.0)
    load_adapter(apply_qlora(tiny_llama(0)), out / "adapter")
    text = capsys.readouterr().out
    assert f"held-out prices (100 prompts): mean error ${before['mae']:.1f} -> ${after['mae']:.1f}" in text
    assert f"wrote {out}/adapter/" in text


def _write_jsonl(path, bad_lines):
    """30 good rows with bad ones inserted so that they land on the given line numbers."""
    good = iter(json.dumps({"text": p.description, "price": p.price}) for p in generate_products(30, seed=9))
    total = 30 + len(bad_lines)
    lines = [bad_lines[n] if n in bad_lines else next(good) for n in range(1, total + 1)]
    path.write_text("\n".join(lines) + "\n")


BAD_ROWS = {
    3: '{"text": "a lamp", "price": 12',
    7: '{"text": "a lamp"}',
    8: '{"text": "a lamp", "price": "12 dollars"}',
    12: '{"text": "a lamp", "price": -4}',
    15: '{"text": "a sofa", "price": 1299}',  # the evaluation answers 0-999
    16: '{"text": "a sofa", "price": 999.5}',  # taught as $1000
    20: '{"text": "   ", "price": 10}',
    25: '[1, 2]',
    31: '',
}


def test_malformed_rows_are_reported_by_line_and_skipped_or_refused(tmp_path, capsys):
    data = tmp_path / "products.jsonl"
    _write_jsonl(data, BAD_ROWS)
    assert main(["train", "--data", str(data), "--steps", "1", *QUICK, "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    for line, message in [(3, "not valid JSON"), (7, "expected an object with 'text' and 'price'"),
                          (8, "'price' must be a number, got '12 dollars'"), (12, "'price' must not be negative, got -4"),
                          (15, "'price' 1299 is above 999, the most the evaluation can answer"),
                          (16, "'price' 999.5 is above 999"),
                          (20, "'text' is empty"), (25, "expected an object"), (31, "empty line")]:
        assert f"{data}:{line}: {message}" in out
    assert "data: 39 rows read, 9 skipped (lines 3, 7, 8, 12, 15, 16, 20, 25, 31)" in out
    assert _metrics(tmp_path / "run")["data"] == {"source": str(data), "sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
                                                  "train_examples": 22, "held_out": 8}

    assert main(["train", "--data", str(data), "--strict", "--steps", "1", *QUICK, "--out", str(tmp_path / "strict")]) == 2
    captured = capsys.readouterr()
    assert "data: 39 rows read, 9 skipped" in captured.out and f"{data}:15:" in captured.out
    assert "has 9 bad row(s) (listed above); fix them, or drop --strict" in captured.err
    assert not (tmp_path / "strict").exists()


def test_ctrl_c_saves_and_resume_continues_exactly_where_it_stopped(tmp_path, monkeypatch, capsys):
    """Dropout 0.1 and gradient accumulation, so the RNG, the data order and the optimizer state all have to come back."""
    settings = ["--steps", "6", "--dropout", "0.1", "--grad-accum", "2", *QUICK]
    assert main(["train", *settings, "--out", str(tmp_path / "straight")]) == 0

    real_step, calls = training_run.optimizer_step, []

    def interrupted(ctrl_c_at, how):
        def step(*args, **kwargs):
            calls.append(1)
            if len(calls) == ctrl_c_at and how == "signal":
                signal.raise_signal(signal.SIGINT)  # first Ctrl-C: this step finishes, then the run saves and stops
            if len(calls) == ctrl_c_at and how == "raise":
                raise KeyboardInterrupt  # as a second Ctrl-C would, mid-step: the step is dropped
            return real_step(*args, **kwargs)
        return step

    run = tmp_path / "stopped"
    monkeypatch.setattr(training_run, "optimizer_step", interrupted(2, "signal"))
    assert main(["train", *settings, "--out", str(run)]) == 130
    assert _metrics(run)["steps_done"] == 2 and _metrics(run)["interrupted"] and (run / "loss.png").exists()
    assert "Ctrl-C: stopping after this step" in capsys.readouterr().out

    calls.clear()
    monkeypatch.setattr(training_run, "optimizer_step", interrupted(3, "raise"))  # resumed steps 3, 4, then 5 breaks
    assert main(["train", "--resume", str(run)]) == 130
    assert _metrics(run)["steps_done"] == 4
    monkeypatch.setattr(training_run, "optimizer_step", real_step)
    assert main(["train", "--resume", str(run)]) == 0
    assert f"resuming {run} at step 4 of 6" in capsys.readouterr().out

    straight, resumed = _metrics(tmp_path / "straight"), _metrics(run)
    assert resumed["train_loss"] == straight["train_loss"] and resumed["lr"] == straight["lr"]
    assert resumed["after"] == straight["after"]
    expected, got = _adapter(tmp_path / "straight"), _adapter(run)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_second_ctrl_c_while_saving_still_saves_everything(tmp_path, monkeypatch, capsys):
    """Ctrl-C at step 2, and again while the adapter is written: once a traceback, with no metrics.json or charts."""
    import lora_lab.finetune.adapters as adapters

    real_step, real_save = training_run.optimizer_step, adapters.save_adapter

    def step(*args, **kwargs):
        steps_taken.append(1)
        if len(steps_taken) == 2:
            signal.raise_signal(signal.SIGINT)  # the first Ctrl-C: step 2 finishes, then the run saves
        return real_step(*args, **kwargs)

    def save_adapter(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)  # the second Ctrl-C, in the middle of saving
        return real_save(*args, **kwargs)

    steps_taken = []
    monkeypatch.setattr(training_run, "optimizer_step", step)
    monkeypatch.setattr(adapters, "save_adapter", save_adapter)
    run = tmp_path / "run"
    assert main(["train", "--steps", "4", *QUICK, "--out", str(run)]) == 130
    assert "still saving the last finished step" in capsys.readouterr().out
    assert _metrics(run)["steps_done"] == 2 and _metrics(run)["interrupted"]
    assert (run / "loss.png").read_bytes()[:8] == PNG and (run / "prices.png").read_bytes()[:8] == PNG


def test_resume_refuses_changed_settings_and_a_finished_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--steps", "1", *QUICK, "--out", str(out)]) == 0
    assert main(["train", "--resume", str(out), "--r", "16"]) == 2
    assert "--resume keeps the run's settings; drop --r 16 (the run has 8)" in capsys.readouterr().err
    assert main(["train", "--resume", str(out)]) == 2
    assert "already did 1 steps; pass --steps above 1" in capsys.readouterr().err
    assert main(["train", "--steps", "1", *QUICK, "--out", str(out)]) == 2
    hint = f"{out} already holds files; choose another --out, add --overwrite, or continue it with --resume {out}"
    assert hint in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "--resume expects a folder written by lora-lab train" in capsys.readouterr().err


def test_resume_refuses_a_data_file_that_changed(tmp_path, capsys):
    """The rows decide the split and the batches: a changed file would train on others and compare against others."""
    data, out = tmp_path / "products.jsonl", tmp_path / "run"
    _write_jsonl(data, {})
    assert main(["train", "--data", str(data), "--steps", "1", *QUICK, "--out", str(out)]) == 0
    _write_jsonl(data, {5: '{"text": "a new lamp", "price": 12}'})
    assert main(["train", "--resume", str(out), "--steps", "2"]) == 2
    assert f"{data} changed since the run in {out} started" in capsys.readouterr().err
    _write_jsonl(data, {})  # restored: the run goes on
    assert main(["train", "--resume", str(out), "--steps", "2"]) == 0


def test_an_empty_data_file_is_explained_without_eval_size(tmp_path, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    assert main(["train", "--data", str(data), *QUICK, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{data} has no usable rows; expected one JSON object per line" in err and "--eval-size" not in err


def test_extending_a_finished_cosine_run_goes_on_from_its_learning_rate(tmp_path, capsys):
    """More --steps on resume: the rate decays on from where the run stopped, never back to the peak."""
    out = tmp_path / "run"
    assert main(["train", "--steps", "6", "--warmup-ratio", "0.2", *QUICK, "--out", str(out)]) == 0
    first = _metrics(out)["lr"]
    assert main(["train", "--resume", str(out), "--steps", "10"]) == 0
    assert "the learning rate goes on from" in capsys.readouterr().out
    rates = _metrics(out)["lr"]
    assert rates[:6] == first and rates[6] == first[5]  # the step after the last one gets the last one's rate
    assert all(later < earlier for earlier, later in zip(rates[6:], rates[7:]))  # then cosine down to the new end
    segments = torch.load(out / "resume.pt", weights_only=True)["schedule"]
    assert [(s["start"], s["end"], s["warmup"]) for s in segments] == [(0, 6, 2), (6, 10, 0)]


def test_course_preset_and_explicit_flags_override_it(tmp_path):
    out = tmp_path / "course"
    assert main(["train", "--preset", "course", "--r", "16", "--steps", "1", *QUICK, "--out", str(out)]) == 0
    settings = _metrics(out)["settings"]
    assert (settings["r"], settings["alpha"], settings["dropout"], settings["lr"]) == (16, 64.0, 0.1, 1e-4)
    assert (settings["scheduler"], settings["warmup_ratio"]) == ("cosine", 0.03)
    assert settings["targets"] == "q_proj,k_proj,v_proj,o_proj"
    config = json.loads((out / "adapter" / CONFIG_NAME).read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (16, 64.0, 0.1)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "nowhere.jsonl"], "--data expects 'builtin' or a JSONL file; nowhere.jsonl is not a file"),
        (["--model", "nowhere"], "--model expects 'tiny' or a local Hugging Face checkpoint directory"),
        (["--backend", "triton"], "--backend triton runs fused Triton kernels and needs a CUDA GPU"),
        (["--targets", "q_proj,qkv"], "target module(s) qkv match no nn.Linear"),
    ],
)
def test_bad_settings_are_explained(tmp_path, capsys, argv, message):
    if "triton" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["train", *QUICK, "--out", str(tmp_path / "run"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--data", "--steps", "--batch-size", "--grad-accum", "--r", "--alpha", "--dropout", "--lr",
                 "--scheduler", "--warmup-ratio", "--backend", "--out", "--seed", "--eval-size", "--preset", "--strict",
                 "--resume", "--nproc", "cosine,constant,linear", "Ctrl-C"):
        assert flag in text, flag


def _checkpoint_with_tokenizer(path):
    """The tiny Llama saved as a Hugging Face checkpoint with its tokenizer, as the README's snippet does."""
    tiny_llama(0).save_pretrained(path)
    get_tokenizer().save_pretrained(path)
    return path


def test_a_checkpoint_directory_trains_like_the_same_model_in_memory(tmp_path, capsys):
    path = _checkpoint_with_tokenizer(tmp_path / "checkpoint")
    settings = ["--steps", "3", *QUICK]
    assert main(["train", "--model", str(path), *settings, "--out", str(tmp_path / "from_path")]) == 0
    assert main(["train", "--model", "tiny", *settings, "--out", str(tmp_path / "tiny")]) == 0
    from_path, tiny = _metrics(tmp_path / "from_path"), _metrics(tmp_path / "tiny")
    assert from_path["before"] == tiny["before"] and from_path["train_loss"] == tiny["train_loss"]
    config = json.loads((tmp_path / "from_path" / "adapter" / CONFIG_NAME).read_text())
    assert config["base_model_name_or_path"] == str(path)

    (path / "tokenizer.json").unlink()
    (path / "tokenizer_config.json").unlink()
    capsys.readouterr()
    assert main(["train", "--model", str(path), *settings, "--out", str(tmp_path / "no_tokenizer")]) == 2
    err = capsys.readouterr().err  # what is missing, and how to add it
    assert "has no tokenizer (tokenizer.json)" in err and "tiny Llama: lora_lab.data.get_tokenizer().save_pretrained(path)" in err


def test_optimizer_step_is_training_step_and_accumulation_matches_one_big_batch():
    def model_and_optimizer():
        torch.manual_seed(0)
        model = apply_qlora(tiny_llama(0))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith("lora_B"):
                    parameter.normal_(std=0.02, generator=torch.Generator().manual_seed(len(name)))
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    batch = collate_products(generate_products(8, seed=4))
    reference, optimizer = model_and_optimizer()
    expected_loss = training_step(reference, batch, optimizer)
    model, optimizer = model_and_optimizer()
    assert optimizer_step(model, [batch], optimizer) == expected_loss
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), model.parameters()))

    halves = [collate_products(generate_products(8, seed=4)[i : i + 4]) for i in (0, 4)]
    accumulated, optimizer = model_and_optimizer()
    assert optimizer_step(accumulated, halves, optimizer) == pytest.approx(expected_loss, rel=1e-6)
    for a, b in zip(reference.parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)  # the first AdamW step moves each element by about lr


def test_learning_rate_schedules():
    assert [lr_multiplier(s, 10, 2, "constant") for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_multiplier(2, 10, 2, "cosine") == 1.0 and lr_multiplier(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(6, 10, 2, "linear") == pytest.approx(0.5) and lr_multiplier(9, 10, 0, "linear") == pytest.approx(0.1)


def test_two_processes_train_like_one(tmp_path, cache_dir):
    """--nproc 2 re-launches under torchrun (gloo, 2 CPU processes); the losses equal one process's up to summation order."""
    settings = ["--steps", "3", *QUICK]
    assert main(["train", *settings, "--out", str(tmp_path / "one")]) == 0
    command = [sys.executable, "-m", "lora_lab.cli", "train", "--nproc", "2", *settings, "--out", str(tmp_path / "two")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=240,
                         env={**os.environ, "LORA_LAB_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "torch.distributed.run --standalone --nproc-per-node 2 -m lora_lab.cli train" in run.stdout
    assert run.stdout.count("held-out prices") == 1  # only rank 0 prints
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert two["world_size"] == 2 and two["settings"]["steps"] == 3
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
    assert two["after"]["loss"] == pytest.approx(one["after"]["loss"], rel=1e-4)


def test_bf16_and_gradient_checkpointing_train_and_are_kept_on_resume(tmp_path, capsys):
    """--bf16 --gradient-checkpointing: the loss falls as in fp32 (bf16 rounding aside), and --resume keeps both."""
    out = tmp_path / "bf16"
    argv = ["train", "--steps", "4", *QUICK, "--lr", "1e-2"]
    assert main([*argv, "--bf16", "--gradient-checkpointing", "--out", str(out)]) == 0
    assert "precision: bf16 base and compute, fp32 adapters; gradient checkpointing on" in capsys.readouterr().out
    assert main([*argv, "--out", str(tmp_path / "fp32")]) == 0
    bf16, fp32 = _metrics(out), _metrics(tmp_path / "fp32")
    assert bf16["settings"]["bf16"] and bf16["settings"]["gradient_checkpointing"]
    assert bf16["train_loss"][-1] < bf16["train_loss"][0]
    assert abs(bf16["train_loss"][0] - fp32["train_loss"][0]) < 0.05 * fp32["train_loss"][0]  # bf16 keeps ~3 digits
    assert main(["train", "--resume", str(out), "--steps", "5", "--bf16"]) == 0
    assert _metrics(out)["settings"]["bf16"]
