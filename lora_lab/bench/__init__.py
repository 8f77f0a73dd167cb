"""``lora-lab bench``: correctness and speed of the QLoRA layer and kernels against real baselines.

- ``command``: the command line (it imports no torch, so ``--help`` is instant) and Ctrl-C;
- ``names``: the ops, dtypes and implementations the command line accepts;
- ``runner``: one run: the cases, the measuring, the printed comparisons and the results file;
- ``cases``: what is measured (Llama shapes, ops, dtypes) and the inputs drawn for it;
- ``impls``: the implementations side by side (fused kernels, dequantize + cuBLAS, peft + bitsandbytes, ...);
- ``timing``: the timing loop, with fresh inputs and the roofline;
- ``timers``: the clocks it uses, bound at import (CUDA events after an L2 flush, CUDA-graph replays at M <= 16, perf-counter);
- ``correctness``: the float64 re-check after timing (a wrong result is WRONG, never fast);
- ``report``: the table, the summary, the ratios against bitsandbytes / peft, the chart and the JSON;
- ``nf4_storage``: NF4 quantize and dequantize of one weight, reference against bitsandbytes (CPU);
- ``model_step``: the tiny model's whole training step, reference against peft + bitsandbytes;
- ``plan``, ``plan_model``, ``launch_count``: ``--plan``, the static performance model of each kernel path, and the
  launches it counts from the code.
"""
