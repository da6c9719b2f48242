import pytest

from genfast.data.shapes import ShapesDataset, grammar_words
from genfast.data.tokenizer import MAX_LENGTH, UNK, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(grammar_words(), tmp_path_factory.mktemp("tok"))


def test_every_grammar_word_is_one_token(tokenizer):
    for word in grammar_words():
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] != tokenizer.unk_token_id, word


def test_captions_round_trip(tokenizer):
    ds = ShapesDataset(300, seed=5, p_two=0.3)
    for i in range(300):
        text = ds.sample(i)[1]
        ids = tokenizer(text).input_ids
        assert len(ids) <= MAX_LENGTH
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_unknown_word_becomes_unknown_token(tokenizer):
    ids = tokenizer("a zebra circle").input_ids
    assert tokenizer.convert_tokens_to_ids(UNK) in ids
    assert tokenizer.convert_tokens_to_ids("circle</w>") in ids


def test_empty_prompt_and_padding(tokenizer):
    assert tokenizer("").input_ids == [tokenizer.bos_token_id, tokenizer.eos_token_id]
    padded = tokenizer(["", "a red circle"], padding="max_length", max_length=MAX_LENGTH).input_ids
    assert all(len(p) == MAX_LENGTH for p in padded)
    assert tokenizer("A RED Circle").input_ids == tokenizer("a red circle").input_ids
