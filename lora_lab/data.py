"""Product-price prompts, the tokenizer, and the labels that say what to learn.

The lecture fine-tunes a base model to answer one question about a product:

    How much does this cost to the nearest dollar?

    <description>

    Price is $249

Everything here is synthetic and built in code (no downloads). Descriptions
come from a seeded generator whose price is a fixed function of what the
description says: the category sets a base price, the brand's tier (budget,
standard, premium) and the size scale it, each listed feature adds 15%, and the
colour and the wording change nothing. So there is a real pattern to learn.

The tokenizer is word-level, and, as in Llama 3, every integer from 0 to 999 is
one token (longer numbers split into chunks of up to three digits). The price is
therefore ONE next-token prediction, and the labels are -100 (ignored)
everywhere except that single token.

The base model is pre-trained on the same products written as shop listings
("Green cordless drill by Trevano, 18 volt. Sells for $54."): it knows the
products and roughly what they cost, but has never been asked the question.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

QUESTION = "How much does this cost to the nearest dollar?"
PRICE_PREFIX = "Price is $"
LISTING_PRICE_PREFIX = "Sells for $"  # the pre-training text's phrasing (see ``listing``)
IGNORE_INDEX = -100  # label value that the loss skips (PyTorch and transformers use the same)

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)
FIRST_NUMBER_ID = len(SPECIAL_TOKENS)  # "0" ... "999" follow the special tokens, in order
LARGEST_SINGLE_TOKEN_NUMBER = 999

# One token is a newline, a run of 1-3 digits, a run of letters, or one other symbol; spaces separate tokens.
TOKEN_PATTERN = r"\n|\d{1,3}|[A-Za-z]+|[^\sA-Za-z\d]"


@dataclass(frozen=True)
class Category:
    noun: str  # what the product is, as it appears in the description
    base_price: float  # dollars for a standard brand, middle size, no listed features
    sizes: tuple[str, str, str]  # small, middle, large
    features: tuple[str, ...]  # optional extras; each adds FEATURE_PREMIUM to the price


CATEGORIES = (
    Category("wireless earbuds", 40, ("20 hour battery", "30 hour battery", "40 hour battery"),
             ("noise cancelling", "water resistant", "wireless charging case")),
    Category("blender", 50, ("40 oz", "64 oz", "72 oz"), ("glass jar", "self cleaning", "touch controls")),
    Category("coffee maker", 60, ("4 cup", "8 cup", "12 cup"), ("thermal carafe", "programmable timer", "milk frother")),
    Category("backpack", 35, ("20 liter", "30 liter", "40 liter"), ("laptop sleeve", "water resistant", "lifetime warranty")),
    Category("monitor", 150, ("22 inch", "27 inch", "32 inch"), ("curved screen", "adjustable stand", "built in speakers")),
    Category("television", 240, ("43 inch", "55 inch", "65 inch"), ("smart apps", "voice remote", "wall mount")),
    Category("vacuum cleaner", 120, ("600 watt", "900 watt", "1200 watt"), ("cordless", "pet hair brush", "washable filter")),
    Category("laptop", 260, ("8 GB memory", "16 GB memory", "32 GB memory"),
             ("touch screen", "backlit keyboard", "fingerprint reader")),
    Category("tent", 80, ("2 person", "4 person", "6 person"), ("rain fly", "carry bag", "aluminum poles")),
    Category("cordless drill", 55, ("12 volt", "18 volt", "20 volt"), ("two batteries", "carry case", "brushless motor")),
    Category("desk lamp", 25, ("12 inch", "18 inch", "24 inch"), ("dimmable", "usb charging port", "touch controls")),
    Category("water bottle", 14, ("16 oz", "24 oz", "32 oz"), ("insulated", "straw lid", "stainless steel")),
    Category("office chair", 130, ("medium", "large", "extra large"), ("lumbar support", "adjustable arms", "mesh back")),
    Category("air fryer", 70, ("2 quart", "4 quart", "6 quart"), ("digital display", "dishwasher safe", "rotisserie")),
)
SIZE_MULTIPLIERS = (0.75, 1.0, 1.4)
FEATURE_PREMIUM = 0.15
BRAND_TIERS = {  # tier: (price multiplier, brands in that tier)
    "budget": (0.6, ("Basix", "Valuline", "Thrifto")),
    "standard": (1.0, ("Homeway", "Northpeak", "Trevano")),
    "premium": (1.8, ("Aurelius", "Kestrel", "Solenne")),
}
COLORS = ("black", "white", "silver", "gray", "blue", "red", "green")
# Wordings of the same facts; {features} is "" or a trailing sentence.
TEMPLATES = (
    "{brand} {size} {noun}, {color}.{features}",
    "{Color} {noun} by {brand}, {size}.{features}",
    "{brand} {noun} in {color}. Size: {size}.{features}",
)


@dataclass(frozen=True)
class Product:
    description: str
    price: int  # whole dollars, 1 ... 999: one token
    category: str
    brand: str
    tier: str
    size: str
    features: tuple[str, ...]


def retail_price(dollars: float) -> int:
    """Round like a shop: under $20 to the dollar, above that to the nearest $5 minus one ($24, $149)."""
    price = max(1, round(dollars)) if dollars < 20 else 5 * round(dollars / 5) - 1
    return min(price, LARGEST_SINGLE_TOKEN_NUMBER)


def _describe(rng: random.Random, category: Category, brand: str, size: str, features: list[str]) -> str:
    color = rng.choice(COLORS)
    listed = f" Features: {', '.join(features)}." if features else ""
    template = rng.choice(TEMPLATES)
    return template.format(brand=brand, size=size, noun=category.noun, color=color, Color=color.capitalize(), features=listed)


def generate_products(n: int, seed: int = 0) -> list[Product]:
    """``n`` products drawn from a seeded generator: the same seed always gives the same catalogue."""
    if n < 0:
        raise ValueError(f"expected a non-negative number of products, got {n}")
    rng = random.Random(seed)
    products = []
    for _ in range(n):
        category = rng.choice(CATEGORIES)
        tier = rng.choice(tuple(BRAND_TIERS))
        tier_multiplier, brands = BRAND_TIERS[tier]
        brand = rng.choice(brands)
        size_index = rng.randrange(3)
        features = rng.sample(category.features, rng.randint(0, len(category.features)))
        dollars = category.base_price * tier_multiplier * SIZE_MULTIPLIERS[size_index] * (1 + FEATURE_PREMIUM * len(features))
        description = _describe(rng, category, brand, category.sizes[size_index], features)
        products.append(
            Product(description, retail_price(dollars), category.noun, brand, tier, category.sizes[size_index], tuple(features))
        )
    return products


def prompt(description: str) -> str:
    """The question the model answers; the price token comes right after the final '$'."""
    return f"{QUESTION}\n\n{description}\n\n{PRICE_PREFIX}"


# ---------------------------------------------------------------------------- the tokenizer


def _pieces(text: str) -> list[str]:
    return re.findall(TOKEN_PATTERN, text)


def _vocabulary() -> list[str]:
    """Special tokens, "0" ... "999", zero-led digit chunks, then every other piece the generator can write."""
    texts = [prompt(""), LISTING_PRICE_PREFIX, *TEMPLATES, *COLORS, *(c.capitalize() for c in COLORS), "Features: ,"]
    for category in CATEGORIES:
        texts += [category.noun, *category.sizes, *category.features]
    for _, brands in BRAND_TIERS.values():
        texts += brands
    numbers = [str(i) for i in range(LARGEST_SINGLE_TOKEN_NUMBER + 1)]
    # Chunks of longer numbers may start with 0 ("1000000" is "100", "000", "0"); they are not prices.
    zero_led = [f"{i:02d}" for i in range(10)] + [f"{i:03d}" for i in range(100)]
    words = {p for text in texts for p in _pieces(re.sub(r"\{\w+\}", " ", text))} - set(numbers) - set(zero_led)
    return [*SPECIAL_TOKENS, *numbers, *zero_led, *sorted(words)]


VOCABULARY = tuple(_vocabulary())
VOCAB_SIZE = len(VOCABULARY)
_NO_SPACE_BEFORE = set(".,:;!?%)\n")
_NO_SPACE_AFTER = set("$(\n")


class PriceTokenizer:
    """Word-level tokenizer (the ``tokenizers`` library) in which every integer 0-999 is one token.

    Encoding runs in the Rust ``tokenizers`` backend; decoding is a few lines of
    Python because spacing rules ("$249", "oz.", "1200") are easier to read here
    than to express as ``tokenizers`` decoders.
    """

    def __init__(self) -> None:
        from tokenizers import Regex, Tokenizer, pre_tokenizers
        from tokenizers.models import WordLevel

        self.vocabulary = VOCABULARY
        backend = Tokenizer(WordLevel({token: i for i, token in enumerate(VOCABULARY)}, unk_token=UNK))
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(" ", "removed"), pre_tokenizers.Split(Regex(TOKEN_PATTERN), "isolated")]
        )
        self.backend = backend

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [BOS_ID, *ids] if add_bos else ids

    def token_text(self, token_id: int) -> str:
        """The text of one token ("249", "blender", "\\n", "<pad>")."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"expected a token id in [0, {self.vocab_size}), got {token_id}")
        return self.vocabulary[token_id]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text for ``ids``; for the generator's text, ``decode(encode(text, add_bos=False)) == text``."""
        out: list[str] = []
        previous = ""
        for token_id in ids:
            token = self.token_text(int(token_id))
            if skip_special_tokens and token in SPECIAL_TOKENS:
                continue
            glued = (
                not out or token in _NO_SPACE_BEFORE or previous in _NO_SPACE_AFTER or (previous.isdigit() and token.isdigit())
            )
            out.append(token if glued else " " + token)
            previous = token
        return "".join(out)

    def save_pretrained(self, path) -> None:
        """Write this tokenizer into ``path`` as a Hugging Face one (``tokenizer.json`` and its config).

        A checkpoint folder carries its own tokenizer: ``lora-lab train --model PATH`` and
        ``AutoTokenizer.from_pretrained(PATH)`` read it from there. Next to
        ``tiny_llama().save_pretrained(PATH)`` this makes the folder a complete checkpoint.
        The saved tokenizer encodes as ``encode``: ``<bos>`` first when special tokens are added.
        """
        from tokenizers import Tokenizer
        from tokenizers.processors import TemplateProcessing
        from transformers import PreTrainedTokenizerFast

        backend = Tokenizer.from_str(self.backend.to_str())  # a copy: this tokenizer's own encode adds no <bos>
        backend.post_processor = TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, BOS_ID)])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK)
        tokenizer.save_pretrained(path)

    def price_token_id(self, price: int) -> int:
        if isinstance(price, bool) or not isinstance(price, int) or not 0 <= price <= LARGEST_SINGLE_TOKEN_NUMBER:
            raise ValueError(f"expected a whole-dollar price from 0 to {LARGEST_SINGLE_TOKEN_NUMBER}, got {price!r}")
        return FIRST_NUMBER_ID + price

    def price_of(self, token_id: int) -> int | None:
        """The number a token stands for, or None if it is not one of "0" ... "999"."""
        number = int(token_id) - FIRST_NUMBER_ID
        return number if 0 <= number <= LARGEST_SINGLE_TOKEN_NUMBER else None


@functools.cache
def get_tokenizer() -> PriceTokenizer:
    """The one shared tokenizer (building it is cheap, but there is no reason to do it twice)."""
    return PriceTokenizer()


# ---------------------------------------------------------------------------- batches


def encode_example(product: Product, tokenizer: PriceTokenizer | None = None) -> list[int]:
    """<bos> prompt tokens, then the price token last."""
    tokenizer = tokenizer or get_tokenizer()
    return tokenizer.encode(prompt(product.description)) + [tokenizer.price_token_id(product.price)]


def _pad(sequences: list[list[int]], labelled: list[slice]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; labels copy the tokens inside ``labelled[row]`` and are -100 elsewhere."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    labels = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, span) in enumerate(zip(sequences, labelled)):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, span] = input_ids[row, span]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate(products: Sequence[Product], tokenizer: PriceTokenizer | None = None) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` for a batch of price prompts.

    ``labels`` line up with ``input_ids`` (the loss shifts them) and are -100
    everywhere except the price token, so fine-tuning learns the answer, not
    the question, and padding never counts.
    """
    if not products:
        raise ValueError("expected at least one product to collate")
    sequences = [encode_example(p, tokenizer) for p in products]
    return _pad(sequences, [slice(len(ids) - 1, len(ids)) for ids in sequences])


def listing(product: Product) -> str:
    """How the product appears in the pre-training text: a shop listing, not the lecture's question."""
    return f"{product.description} {LISTING_PRICE_PREFIX}{product.price}."


def collate_listings(products: Sequence[Product], tokenizer: PriceTokenizer | None = None) -> dict[str, torch.Tensor]:
    """A batch of shop listings with every real token labelled: plain language-model pre-training."""
    if not products:
        raise ValueError("expected at least one product to collate")
    tokenizer = tokenizer or get_tokenizer()
    sequences = [tokenizer.encode(listing(p)) for p in products]
    return _pad(sequences, [slice(0, len(ids)) for ids in sequences])
