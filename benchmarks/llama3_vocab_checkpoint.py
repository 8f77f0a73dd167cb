"""Save a tiny Llama with Llama 3's vocabulary size, 128,256 tokens, as a local checkpoint folder.

    python benchmarks/llama3_vocab_checkpoint.py runs/tiny-llama3-vocab
    lora-lab train --model runs/tiny-llama3-vocab --bf16 --gradient-checkpointing --steps 20 --out runs/llama3-vocab

What makes a step slow at Llama 3's scale on a small model is the vocabulary: the
output head is (128,256 x hidden), and the logits of a batch are (batch x sequence
x 128,256). This folder reproduces that without any download (the hub is
unreachable here, and Llama 3's tokenizer files are gated):

- the model is lora_lab's pre-trained tiny Llama (hidden 64, 2 layers), its
  embeddings and lm_head resized by transformers to 128,256 rows (the first
  1,266 are the trained ones);
- the tokenizer is built with the ``tokenizers`` library: lora_lab's word-level
  price tokenizer, in which every number 0-999 is one token as in Llama 3,
  padded to 128,256 entries with Llama 3's names for its reserved special tokens.
  It knows the built-in catalogue's words only; Llama 3's real BPE would split
  unknown words instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LLAMA3_VOCAB = 128_256


def save_checkpoint(path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    from lora_lab.data import BOS, BOS_ID, EOS, PAD, UNK, get_tokenizer
    from lora_lab.finetune.base_model import pretrained_tiny_llama

    model, _, _ = pretrained_tiny_llama(0, progress=True)
    model.resize_token_embeddings(LLAMA3_VOCAB)
    model.save_pretrained(path)

    spec = json.loads(get_tokenizer().backend.to_str())
    vocab = spec["model"]["vocab"]
    reserved = LLAMA3_VOCAB - len(vocab)
    vocab.update({f"<|reserved_special_token_{i}|>": len(vocab) + i for i in range(reserved)})
    backend = Tokenizer.from_str(json.dumps(spec))
    backend.post_processor = TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, BOS_ID)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK)
    if len(tokenizer) != LLAMA3_VOCAB or any(len(tokenizer(str(n), add_special_tokens=False)["input_ids"]) != 1
                                             for n in range(1000)):
        raise SystemExit("the tokenizer should have 128,256 tokens with every number 0-999 one token")
    tokenizer.save_pretrained(path)
    print(f"wrote {path}: tiny Llama, vocabulary {LLAMA3_VOCAB:,} (tokenizer.json, config.json, model.safetensors)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="the folder to write (made if missing)")
    save_checkpoint(parser.parse_args().path)
