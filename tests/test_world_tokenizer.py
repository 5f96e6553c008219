"""The world model's word tokenizer: one id per grammar word, EOS, padding, unknown words, truncation."""

from __future__ import annotations

import pytest

from astrolabe.world.grammar import all_captions
from astrolabe.world.tokenizer import EOS_ID, PAD_ID, UNK_ID, WORDS, WorldWordTokenizer


def test_every_caption_word_has_its_own_id_and_the_rest_is_padding() -> None:
    tok = WorldWordTokenizer()
    captions = [c.text for c in all_captions()]
    out = tok(captions, max_length=16)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape == (len(captions), 16)
    for row, caption in zip(ids.tolist(), captions, strict=True):
        n = len(caption.split())
        assert row[n] == EOS_ID and all(i == PAD_ID for i in row[n + 1 :])
        assert UNK_ID not in row[:n] and len(set(row[:n])) == len(set(caption.split()))
    assert mask.sum(dim=1).tolist() == [len(c.split()) + 1 for c in captions]
    assert len({tok.ids(w)[0] for w in WORDS}) == len(WORDS) and max(tok.ids(" ".join(WORDS))) < 384


def test_left_and_right_differ_in_one_id_at_one_place() -> None:
    tok = WorldWordTokenizer()
    left = tok.ids("a red circle moving left slowly on a blue background")
    right = tok.ids("A red circle moving RIGHT slowly on a blue background.")
    assert [i for i, (a, b) in enumerate(zip(left, right, strict=True)) if a != b] == [4]


def test_scene_syntax_and_unknown_words_and_truncation() -> None:
    tok = WorldWordTokenizer()
    assert tok.ids("a red circle moving left[3s] | a blue square") == [
        *tok.ids("a red circle moving left")[:-1], UNK_ID, *tok.ids("a blue square")]
    ids = tok(["a red circle moving left slowly on a blue background"], max_length=4)["input_ids"][0].tolist()
    assert ids == [*tok.ids("a red circle")[:-1], EOS_ID]
    with pytest.raises(ValueError, match="only pads to max_length"):
        tok(["a red circle"], max_length=8, padding="longest")


def test_ids_are_the_ones_world_model_4_was_trained_with() -> None:
    """A changed id would silently reuse a cached build (the cache key holds the recipe and CODE_VERSION, not the
    tokenizer): change ids only together with CODE_VERSION."""
    assert WorldWordTokenizer().ids("a red circle moving left slowly on a blue background") == [
        10, 12, 18, 21, 22, 26, 30, 10, 14, 31, EOS_ID]
    assert WorldWordTokenizer().ids("an white triangle staying still") == [11, 17, 20, 28, 29, EOS_ID]
