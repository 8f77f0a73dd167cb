"""``lora-lab size`` figures and a smoke test of ``lora-lab demo``."""

import pytest
import torch

from lora_lab.cli import main
from lora_lab.cli.size import nf4_bytes, size_report
from lora_lab.nf4 import quantize_nf4


def test_llama_8b_adapter_figures_match_the_lecture():
    report = size_report("llama-3.1-8b", r=32, alpha=64, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    assert report.adapter_params == 27_262_976  # 32 layers x 32 x ((4096+4096) x 2 + (4096+1024) x 2)
    assert report.adapter_fp32_bytes == 109_051_904 and report.adapter_bf16_bytes == 54_525_952
    assert report.total_params == 8_030_261_248
    assert report.adapted_layers == 128
    assert report.nf4_double_quant_bytes < report.nf4_bytes < report.bf16_bytes / 2.5


def test_tied_embeddings_are_counted_once():
    assert size_report("llama-3.2-1b", r=8).total_params == 1_235_814_400


@pytest.mark.parametrize("shape", [(64, 64), (7, 100), (3, 2049), (1, 70000)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_arithmetic_equals_real_storage(shape, double_quant):
    assert nf4_bytes(shape[0] * shape[1], 64, double_quant) == quantize_nf4(torch.randn(shape), 64, double_quant).nbytes


def test_size_command_prints_the_figures(capsys):
    argv = ["size", "--preset", "llama-3.1-8b", "--r", "32", "--alpha", "64", "--targets", "q_proj,k_proj,v_proj,o_proj"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "27,262,976" in out and "109.05 MB" in out and "54.53 MB" in out
    assert "NF4 + double quantization" in out and "bf16 (no quantization)" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "llama-9b"], "unknown preset 'llama-9b'; expected one of llama-3.1-8b, llama-3.2-1b, tiny"),
        (["--targets", "q_proj,qkv"], "unknown target module(s) qkv; the linear layers are named down_proj"),
        (["--r", "1000000000"], "expected the rank r from 1 to 1024, the smaller side of k_proj (1024 x 4096) in llama-3.1-8b; "
                                "got 1000000000"),
        (["--preset", "tiny", "--r", "33", "--targets", "q_proj,k_proj"], "expected the rank r from 1 to 32"),
    ],
)
def test_size_command_explains_bad_input(capsys, argv, message):
    assert main(["size", *argv]) == 2
    assert message in capsys.readouterr().err


def test_demo_runs_the_four_steps_and_writes_the_chart(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORA_LAB_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--steps", "3", "--pretrain-steps", "4", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    for heading in ("1. FORWARD", "2. LOSS", "3. BACKWARD", "4. OPTIMIZE", "FINE-TUNING"):
        assert heading in out
    assert "base parameters with a gradient: 0 of" in out
    assert "(lower)" in out
    chart = tmp_path / "run" / "loss.png"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"loss chart: {chart}" in out
    assert "(1 CPU thread(s); see --threads)" in out  # the default: one thread


def test_the_charts_first_held_out_point_is_the_printed_base_model_loss(tmp_path, monkeypatch, capsys):
    from lora_lab.cli import demo

    charted = {}
    monkeypatch.setenv("LORA_LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "plot", lambda losses, held_out, path, title: charted.update(held_out))
    assert main(["demo", "--steps", "2", "--pretrain-steps", "4", "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out.split("base model -> now: loss ")[1].split(" ->")[0]
    assert f"{charted[0]:.3f}" == printed and sorted(charted) == [0, 1, 2]


def test_demo_and_train_default_to_one_thread_and_take_a_flag_or_the_environment(monkeypatch):
    from lora_lab.cli import command_parser, demo
    from lora_lab.cli.threads import ENV
    from lora_lab.finetune import command

    for name, module in (("demo", demo), ("train", command)):
        monkeypatch.delenv(ENV, raising=False)
        assert command_parser(name, module).parse_args([]).threads == 1
        assert command_parser(name, module).parse_args(["--threads", "0"]).threads == 0  # torch's own default
        monkeypatch.setenv(ENV, "3")
        assert command_parser(name, module).parse_args([]).threads == 3
        assert command_parser(name, module).parse_args(["--threads", "2"]).threads == 2


def test_demo_without_plot_and_triton_without_a_gpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORA_LAB_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--steps", "1", "--pretrain-steps", "2", "--no-plot", "--out", str(tmp_path / "run")]) == 0
    assert not (tmp_path / "run").exists()
    if not torch.cuda.is_available():
        assert main(["demo", "--backend", "triton"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_size_help_names_match_the_model_module():
    """size.py spells the presets and default targets out so that `lora-lab --help` does not import torch."""
    from lora_lab import model
    from lora_lab.cli import size

    assert size.PRESET_NAMES == tuple(model.PRESETS) and size.DEFAULT_TARGETS == model.DEFAULT_TARGETS
