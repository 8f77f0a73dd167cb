"""``lora-lab bench``: correctness and speed of the QLoRA layer and kernels against real baselines.

- ``command``: the command line, the run and the results file;
- ``cases``: what is measured (Llama shapes, ops, dtypes) and the inputs drawn for it;
- ``impls``: the implementations side by side (fused kernels, dequantize + cuBLAS, peft + bitsandbytes, ...);
- ``timing``: CUDA-event / perf-counter timing with fresh inputs, an L2 flush and the roofline;
- ``correctness``: the float64 re-check after timing (a wrong result is WRONG, never fast);
- ``report``: the table, the summary, the chart and the JSON;
- ``model_step``: the tiny model's whole training step, reference against peft + bitsandbytes.
"""
