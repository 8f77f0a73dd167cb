"""The synthetic catalogue, the tokenizer and the label masking (lora_lab.data)."""

import pytest
import torch

from lora_lab.data import (
    BOS_ID,
    IGNORE_INDEX,
    PAD_ID,
    UNK_ID,
    VOCAB_SIZE,
    collate,
    collate_listings,
    encode_example,
    generate_products,
    get_tokenizer,
    listing,
    prompt,
    retail_price,
)

TOKENIZER = get_tokenizer()
PRODUCTS = generate_products(300, seed=7)


def test_every_integer_up_to_999_is_one_token_and_round_trips():
    for n in range(1000):
        ids = TOKENIZER.encode(str(n), add_bos=False)
        assert ids == [TOKENIZER.price_token_id(n)], n
        assert TOKENIZER.decode(ids) == str(n)
        assert TOKENIZER.price_of(ids[0]) == n


@pytest.mark.parametrize("text, pieces", [("1200", ["120", "0"]), ("1000000", ["100", "000", "0"]), ("$249.", ["$", "249", "."])])
def test_longer_numbers_split_into_chunks_of_three_digits(text, pieces):
    ids = TOKENIZER.encode(text, add_bos=False)
    assert [TOKENIZER.token_text(i) for i in ids] == pieces
    assert TOKENIZER.decode(ids) == text


def test_generated_text_round_trips_without_unknown_tokens():
    for product in PRODUCTS:
        for text in (prompt(product.description), listing(product)):
            ids = TOKENIZER.encode(text, add_bos=False)
            assert UNK_ID not in ids, text
            assert TOKENIZER.decode(ids) == text


def test_unknown_words_map_to_unk_and_specials_are_skipped_when_decoding():
    ids = TOKENIZER.encode("a zeppelin", add_bos=True)
    assert ids[0] == BOS_ID and UNK_ID in ids
    assert TOKENIZER.decode([BOS_ID, TOKENIZER.price_token_id(5), PAD_ID]) == "5"
    assert TOKENIZER.vocab_size == VOCAB_SIZE


def test_tokenizer_rejects_bad_ids_and_prices():
    with pytest.raises(ValueError, match="token id"):
        TOKENIZER.token_text(VOCAB_SIZE)
    for bad in (1000, -1, 3.5, True):
        with pytest.raises(ValueError, match="price"):
            TOKENIZER.price_token_id(bad)
    assert TOKENIZER.price_of(BOS_ID) is None


def test_generator_is_deterministic_per_seed():
    assert generate_products(50, seed=3) == generate_products(50, seed=3)
    assert generate_products(50, seed=3) != generate_products(50, seed=4)
    assert generate_products(0) == []
    with pytest.raises(ValueError):
        generate_products(-1)


def test_price_depends_only_on_what_the_description_says_matters():
    """Same category, tier, size and number of features -> same price, whatever the colour, brand name and wording."""
    prices = {}
    for p in generate_products(2000, seed=11):
        key = (p.category, p.tier, p.size, len(p.features))
        assert prices.setdefault(key, p.price) == p.price, p
        assert 1 <= p.price <= 999
        assert p.category in p.description and p.brand in p.description and p.size in p.description
        assert all(f in p.description for f in p.features)
    assert len(set(prices.values())) > 50  # varied enough to be worth learning
    assert retail_price(149.7) == 149 and retail_price(12.4) == 12 and retail_price(5000) == 999


def test_collate_pads_right_and_labels_only_the_price():
    batch = collate(PRODUCTS[:5])
    lengths = [len(encode_example(p)) for p in PRODUCTS[:5]]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (5, max(lengths))
    for row, (product, length) in enumerate(zip(PRODUCTS[:5], lengths)):
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (max(lengths) - length)
        assert (batch["input_ids"][row, length:] == PAD_ID).all()
        labelled = (batch["labels"][row] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert labelled == [length - 1]  # the last real token, the price
        assert TOKENIZER.price_of(int(batch["labels"][row, length - 1])) == product.price
        assert TOKENIZER.decode(batch["input_ids"][row, : length - 1]).endswith("Price is $")


def test_collate_listings_labels_every_real_token():
    batch = collate_listings(PRODUCTS[:4])
    real = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"][real], batch["input_ids"][real])
    assert (batch["labels"][~real] == IGNORE_INDEX).all()
    with pytest.raises(ValueError):
        collate([])


def test_the_tokenizer_saved_for_transformers_encodes_the_same(tmp_path):
    """``get_tokenizer().save_pretrained(path)`` next to a saved tiny Llama: transformers reads the same ids back."""
    from transformers import AutoTokenizer

    get_tokenizer().save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for product in generate_products(20, seed=4):
        text = prompt(product.description) + str(product.price)
        assert loaded(text)["input_ids"] == get_tokenizer().encode(text)
        assert loaded(text, add_special_tokens=False)["input_ids"] == get_tokenizer().encode(text, add_bos=False)
