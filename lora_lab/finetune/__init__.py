"""``lora-lab train``: fine-tune a model on your own data, with the textbook's training step.

- ``command``: the command line and the training loop (progress bar, Ctrl-C save, --resume, --nproc);
- ``data_files``: JSONL product files, line-numbered errors, the prompt codec;
- ``report``: held-out price evaluation, the loss and price charts, the saved run;
- ``checkpoint``: ``load_llama``, a local Hugging Face checkpoint streamed into NF4 slice by slice;
- ``adapters``: peft-format ``save_adapter`` / ``load_adapter``;
- ``distributed``: the same step under DDP and FSDP2 (torchrun).
"""
