"""The names ``lora-lab bench`` accepts on its command line, kept free of torch so that ``--help`` answers at once.

``cases.DTYPES`` and ``impls.IMPLS`` map these names to torch dtypes and to
implementations; tests/bench checks that both use exactly these names.
"""

OPS = ("forward", "backward", "step")  # of one layer; step = forward + backward, timed together
MODEL_OPS = ("step", "step-vocab-128k")  # a training step of the tiny model; with Llama 3's vocabulary
STORAGE_OPS = ("quantize", "dequantize")  # NF4 storage of one weight
DTYPE_NAMES = ("fp32", "fp16", "bf16")
IMPL_NAMES = ("fused", "dequant+cublas", "bnb+peft", "dense", "reference")
GPU_IMPLS = ("fused", "dequant+cublas", "bnb+peft", "dense", "reference")
CPU_IMPLS = ("reference", "bnb+peft", "dense")
