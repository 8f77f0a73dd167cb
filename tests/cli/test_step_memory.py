"""``lora-lab size``'s training-step memory, checked against what autograd keeps in a measured tiny-model step.

The formula (lora_lab/cli/step_memory.py) is written per token from the layer's
structure; here a bf16 QLoRA tiny Llama runs lora_lab's forward at two sequence
lengths, and the growth of what it saves for backward (each storage counted
once) is compared with the formula's tokens x bytes per token. Constants (the
adapters cast to bf16, the frozen lm_head weight) cancel in the difference.
"""

import torch

from lora_lab.cli.step_memory import step_memory
from lora_lab.model import DEFAULT_TARGETS, PRESETS, apply_qlora, tiny_llama
from lora_lab.train import forward_labelled


def _saved_bytes(model, batch: int, sequence: int) -> int:
    g = torch.Generator().manual_seed(sequence)
    ids = torch.randint(4, model.config.vocab_size, (batch, sequence), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward_labelled(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return sum(storages.values())


def test_activation_formula_matches_a_measured_bf16_step():
    torch.manual_seed(0)
    model = apply_qlora(tiny_llama(0).to(torch.bfloat16), compute_dtype=torch.bfloat16).train()
    model.model.embed_tokens.weight.requires_grad_(True)  # as in a deeper model, layer 0's input then needs its norm too
    batch, short, long = 2, 24, 72
    measured = _saved_bytes(model, batch, long) - _saved_bytes(model, batch, short)
    adapter_params = sum(p.numel() for p in model.parameters() if p.requires_grad) - model.model.embed_tokens.weight.numel()
    tiny = PRESETS["tiny"]
    predicted = (step_memory(tiny, adapter_params, 8, DEFAULT_TARGETS, batch, long).activations
                 - step_memory(tiny, adapter_params, 8, DEFAULT_TARGETS, batch, short).activations)
    assert abs(measured - predicted) <= 0.1 * measured, (measured, predicted)  # about 2% apart: rotary tables, rounding


def test_optimizer_state_is_three_fp32_copies_of_the_adapters():
    """Gradients and AdamW's two moments: what torch.optim.AdamW holds after a step, exactly."""
    model = apply_qlora(tiny_llama(0))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    moments = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if v.dim() > 0)
    memory = step_memory(PRESETS["tiny"], sum(p.numel() for p in params), 8, DEFAULT_TARGETS, 1, 2)
    assert memory.adam_state == moments and memory.gradients == sum(p.grad.numel() * 4 for p in params)


def test_size_prints_the_step_memory_for_llama_8b(capsys):
    from lora_lab.cli import main

    assert main(["size", "--preset", "llama-3.1-8b", "--batch", "16", "--sequence", "512"]) == 0
    out = capsys.readouterr().out
    assert "Training step: batch 16 x sequence 512 = 8,192 tokens" in out and "with gradient checkpointing" in out
    adam = next(line for line in out.splitlines() if "AdamW moments" in line)
    assert adam.split()[-2:] == ["218.10", "MB"]  # 2 x 4 bytes x 27,262,976 adapter parameters (r=32 on q/k/v/o)
