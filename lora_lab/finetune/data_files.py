"""Your own training data for ``lora-lab train``: JSONL rows, prompts for any tokenizer, and batches.

    rows = read_jsonl(Path("products.jsonl"), strict=False)   # [(text, price)], bad lines reported by number
    codec = PromptCodec(tokenizer)                             # None: the tiny model's word-level tokenizer
    ids, answer_length = codec.example(text, price)            # the lecture's prompt, then the price's tokens
    batch = collate([codec.example(t, p) for t, p in rows[:16]], codec.pad_id)

Each example is the question the lecture fine-tunes for, with the price as the
answer and the only labelled tokens:

    How much does this cost to the nearest dollar?\n\n<text>\n\nPrice is $249

A data file is read in full before training starts. A bad line (not JSON, no
"text" or "price", an empty text, a price that is not a number from 0 to 999)
is reported with its line number; it is then skipped, or the whole file is
refused with ``strict``. Nothing is dropped without saying so. Prices above 999
are bad rows because the price evaluation answers with one number token, 0-999
(as Llama 3's tokenizer has them): such a row could be trained on but never
priced right, and would make the held-out error meaningless.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
from pathlib import Path

from lora_lab.finetune.settings import TrainSettings

BUILTIN_PRODUCTS = 4000  # training set of --data builtin (held-out prompts come from another seed)
MAX_SHOWN_PROBLEMS = 20
MAX_PRICE = 999  # the largest whole-dollar answer the price evaluation can give (one token per number)


class UsageError(Exception):
    """Bad settings or data: reported as ``error: ...`` with exit status 2, never a traceback."""


def read_jsonl(path: Path, strict: bool, say=print) -> list[tuple[str, float]]:
    """``(text, price)`` rows of a JSONL file; every bad line is reported by number, then skipped or (strict) refused."""
    rows, problems, total = [], [], 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            total += 1
            try:
                line = raw.decode("utf-8")
                row = json.loads(line)
            except UnicodeDecodeError:
                problems.append((number, "not UTF-8 text"))
                continue
            except json.JSONDecodeError as error:
                problems.append((number, "empty line" if not line.strip() else f"not valid JSON ({error.msg})"))
                continue
            if not isinstance(row, dict) or "text" not in row or "price" not in row:
                problems.append((number, "expected an object with 'text' and 'price'"))
            elif not isinstance(row["text"], str) or not row["text"].strip():
                problems.append((number, "'text' is empty or not a string"))
            elif isinstance(row["price"], bool) or not isinstance(row["price"], (int, float)) or not math.isfinite(row["price"]):
                problems.append((number, f"'price' must be a number, got {row['price']!r}"))
            elif row["price"] < 0:
                problems.append((number, f"'price' must not be negative, got {row['price']}"))
            elif whole_dollars(row["price"]) > MAX_PRICE:
                problems.append((number, f"'price' {row['price']} is above {MAX_PRICE}, the most the evaluation can answer"))
            else:
                rows.append((row["text"].strip(), float(row["price"])))
    for number, message in problems[:MAX_SHOWN_PROBLEMS]:
        say(f"  {path}:{number}: {message}")
    if len(problems) > MAX_SHOWN_PROBLEMS:
        say(f"  ... and {len(problems) - MAX_SHOWN_PROBLEMS} more")
    lines = ", ".join(str(n) for n, _ in problems[:MAX_SHOWN_PROBLEMS]) + (", ..." if len(problems) > MAX_SHOWN_PROBLEMS else "")
    say(f"data: {total} rows read, {len(problems)} skipped" + (f" (lines {lines})" if problems else ""))
    if problems and strict:
        raise UsageError(f"{path} has {len(problems)} bad row(s) (listed above); fix them, or drop --strict to skip them")
    return rows


def whole_dollars(price: float) -> int:
    """The price as the model is taught it: to the nearest dollar, halves up ($2.50 -> 3)."""
    return math.floor(price + 0.5)


def data_digest(path: str | Path) -> str | None:
    """SHA-256 of a data file's bytes (None if it is missing): a resumed run checks that its rows are the same."""
    if not Path(path).is_file():
        return None  # load_examples says what is wrong with it
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class PromptCodec:
    """Turns (description, price) into token ids with the price's tokens labelled, for either tokenizer.

    The built-in word-level tokenizer for the tiny model, or a checkpoint's own
    (a ``transformers`` tokenizer). The price evaluation needs one token per
    number 0-999, which both have (Llama 3's does too).
    """

    def __init__(self, tokenizer=None, max_length: int = 1024) -> None:
        import torch

        from lora_lab import data

        self.max_length = max_length
        if tokenizer is None:
            self.encode = lambda text, bos: data.get_tokenizer().encode(text, add_bos=bos)
            self.pad_id, self.unk_id = data.PAD_ID, data.UNK_ID
        else:
            self.encode = lambda text, bos: tokenizer(text, add_special_tokens=bos)["input_ids"]
            self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
            self.unk_id = tokenizer.unk_token_id
        numbers = [self.encode(str(n), False) for n in range(1000)]
        split = [n for n, ids in enumerate(numbers) if len(ids) != 1]
        if split:
            raise UsageError(f"the price evaluation reads one token per price, but this tokenizer splits {split[:5]} into "
                             "several; use a tokenizer with one token per number 0-999 (Llama 3's has them)")
        self.number_ids = torch.tensor([ids[0] for ids in numbers])
        self.suffix = len(self.encode("\n\n" + data.PRICE_PREFIX, False))

    def example(self, text: str, price: float) -> tuple[list[int], int]:
        """``(ids, answer length)``: prompt then price tokens, the description cut if the whole is too long."""
        from lora_lab.data import prompt

        ids, answer = self.encode(prompt(text), True), self.encode(str(whole_dollars(price)), False)
        room = self.max_length - len(answer)
        if len(ids) > room:  # cut the description's end, keep "\n\nPrice is $"
            ids = ids[: room - self.suffix] + ids[-self.suffix :]
        return ids + answer, len(answer)


def collate(examples: list[tuple[list[int], int]], pad_id: int) -> dict:
    """Right-padded ``input_ids``/``attention_mask``; ``labels`` are the answer tokens and -100 elsewhere."""
    import torch

    length = max(len(ids) for ids, _ in examples)
    batch = {"input_ids": torch.full((len(examples), length), pad_id), "attention_mask": torch.zeros(len(examples), length,
             dtype=torch.long), "labels": torch.full((len(examples), length), -100)}
    for row, (ids, answer) in enumerate(examples):
        batch["input_ids"][row, : len(ids)] = torch.tensor(ids)
        batch["attention_mask"][row, : len(ids)] = 1
        batch["labels"][row, len(ids) - answer : len(ids)] = torch.tensor(ids[len(ids) - answer :])
    return batch


def batch_rows(step: int, micro: int, settings: TrainSettings, n: int) -> list[int]:
    """Which training examples micro-batch ``micro`` of step ``step`` uses: a fresh seeded shuffle per epoch.

    A pure function of the step, so a resumed run sees the same batches as an uninterrupted one.
    """
    size = settings.batch_size
    first = (step * settings.grad_accum + micro) * size
    return [int(_epoch_order(settings.seed, position // n, n)[position % n]) for position in range(first, first + size)]


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n: int):
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def load_examples(settings: TrainSettings, strict: bool, say=print) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """``(training rows, held-out rows)``: built-in products from two seeds, or a file split by a seeded shuffle."""
    from lora_lab.data import generate_products

    seed, eval_size = settings.seed, settings.eval_size
    if settings.data == "builtin":
        rows = lambda n, s: [(p.description, float(p.price)) for p in generate_products(n, seed=s)]  # noqa: E731
        return rows(BUILTIN_PRODUCTS, seed + 1), rows(eval_size, seed + 2)
    path = Path(settings.data)
    if not path.is_file():
        raise UsageError(f"--data expects 'builtin' or a JSONL file; {path} is not a file")
    rows = read_jsonl(path, strict, say)
    if not rows:
        raise UsageError(f"{path} has no usable rows; expected one JSON object per line, such as "
                         '{"text": "Basix 64 oz blender, red.", "price": 29}')
    if len(rows) <= eval_size:
        raise UsageError(f"{path} has {len(rows)} usable rows and --eval-size {eval_size} holds them all out; lower --eval-size")
    shuffled = random.Random(seed).sample(rows, len(rows))
    return shuffled[eval_size:], shuffled[:eval_size]

