"""The memory of a QLoRA training step beside the weights: activations kept for backward, gradients, AdamW's state.

``lora-lab size`` prints these next to the weight sizes. All of it comes from the
config, as the weights do; ``tests/cli/test_step_memory.py`` checks the
activation formula against what autograd keeps in a measured tiny-model step.

What one decoder layer keeps for backward, per token, when it computes in bf16
(2 bytes) with HF Llama's SDPA attention and NF4 base layers that keep nothing
(they dequantize again in backward):

- each RMSNorm: its input upcast to fp32 and the fp32 reciprocal RMS: 4h + 4 bytes, twice;
- the adapters: each keeps its r-wide ``x @ A^T`` (2r), and a group sharing one
  input keeps that input once: q/k/v the normalized hidden state (2h), gate/up the
  same after attention (2h), down_proj the MLP's product (2i); o_proj's input is
  attention's output, which attention keeps anyway;
- attention: q, k and v after the rotary embedding (2h + 4 kv), its output (2h)
  and the fp32 log-sum-exp per head (4 heads);
- the SwiGLU MLP: gate's and up's outputs and silu(gate): 6i.

With gradient checkpointing a layer keeps only its input (2h) and recomputes the
rest in backward, when one layer's worth exists at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

BF16 = 2  # bytes
FP32 = 4


@dataclass(frozen=True)
class StepMemory:
    tokens: int  # batch x sequence
    labelled: int  # positions whose logits the loss reads
    activations: int  # kept for backward without checkpointing
    activations_checkpointed: int  # with gradient checkpointing
    gradients: int  # the adapters' fp32 gradients
    adam_state: int  # AdamW's two fp32 moments per adapter parameter
    labelled_logits: int  # fp32 logits at the labelled positions (lora_lab's forward)
    full_logits: int  # fp32 logits at every position (what a plain forward computes)


def layer_activation_bytes(hidden: int, intermediate: int, heads: int, kv_heads: int, r: int, targets) -> int:
    """Bytes one decoder layer keeps for backward per token, computing in bf16 (see the module docstring)."""
    kv = kv_heads * (hidden // heads)
    targets = set(targets)
    adapters = BF16 * r * len(targets)
    shared_inputs = BF16 * (hidden * bool(targets & {"q_proj", "k_proj", "v_proj"})
                            + hidden * bool(targets & {"gate_proj", "up_proj"}) + intermediate * ("down_proj" in targets))
    norms = 2 * (FP32 * hidden + FP32)
    attention = BF16 * (2 * hidden + 2 * kv) + FP32 * heads
    mlp = 3 * BF16 * intermediate
    return norms + adapters + shared_inputs + attention + mlp


def step_memory(preset, adapter_params: int, r: int, targets, batch: int, sequence: int, labelled_per_row: int = 1) -> StepMemory:
    """The step's memory for ``batch`` prompts of ``sequence`` tokens, ``labelled_per_row`` answer tokens each."""
    tokens = batch * sequence
    per_layer = layer_activation_bytes(preset.hidden, preset.intermediate, preset.heads, preset.kv_heads, r, targets)
    final_norm = FP32 * preset.hidden + FP32
    labelled = batch * labelled_per_row
    return StepMemory(
        tokens=tokens, labelled=labelled,
        activations=tokens * (preset.layers * per_layer + final_norm) + labelled * BF16 * preset.hidden,
        activations_checkpointed=tokens * (preset.layers * BF16 * preset.hidden + per_layer + final_norm)
        + labelled * BF16 * preset.hidden,
        gradients=FP32 * adapter_params, adam_state=2 * FP32 * adapter_params,
        labelled_logits=FP32 * labelled * preset.vocab, full_logits=FP32 * tokens * preset.vocab,
    )


def format_step_memory(memory: StepMemory, batch: int, sequence: int, human) -> list[str]:
    return [
        "",
        f"Training step: batch {batch} x sequence {sequence} = {memory.tokens:,} tokens, bf16 compute, "
        f"{memory.labelled:,} labelled (one price token a prompt)",
        f"  activations kept for backward   {human(memory.activations):>12}   "
        f"with gradient checkpointing {human(memory.activations_checkpointed)}",
        f"  adapter gradients (fp32)        {human(memory.gradients):>12}",
        f"  AdamW moments (fp32)            {human(memory.adam_state):>12}",
        f"  logits where labels are (fp32)  {human(memory.labelled_logits):>12}   "
        f"at every position {human(memory.full_logits)}",
    ]
