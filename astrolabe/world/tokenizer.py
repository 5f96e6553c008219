"""The world model's word tokenizer: one id per word of the caption grammar, for the tiny UMT5.

Ids: pad 0, EOS 1, unknown word 2, and ``10 + i`` for word ``i`` of :data:`WORDS` (the grammar's whole vocabulary,
:mod:`astrolabe.world.grammar`); all below the tiny UMT5's vocabulary of 384. A text is lower-cased and cut into
runs of letters (``a red circle moving left[3s] | a blue square`` -> ``a red circle moving left s a blue square``:
the scene syntax's digits and marks drop out, ``s`` is unknown), EOS appended, then padded or truncated to
``max_length``.

Why words and not the tiny encoder's ByT5 bytes: with bytes the motion words sit at a different position in every
caption (after colour and shape names of 3-8 bytes) and the world model never tied them to a track (measured in
:mod:`astrolabe.world.pretrain`); one token per word it does. It is called like a Hugging Face tokenizer, the
way :meth:`astrolabe.models.wan.text_encoder.WanTextEncoder.tokenize` calls one.
"""

from __future__ import annotations

import re

import torch

from astrolabe.world.grammar import COLORS, MOVING_DIRECTIONS, SHAPES, SPEED_WORDS

__all__ = ["EOS_ID", "PAD_ID", "UNK_ID", "WORDS", "WorldWordTokenizer"]

WORDS: tuple[str, ...] = (  # in this order: the ids the built world model was trained with
    "a", "an", *COLORS, *SHAPES, "moving", *MOVING_DIRECTIONS, *SPEED_WORDS.values(), "staying", "still", "on",
    "background",
)
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
_FIRST_WORD_ID = 10
_WORD_IDS = {word: _FIRST_WORD_ID + i for i, word in enumerate(WORDS)}
_LETTERS = re.compile(r"[a-z]+")


class WorldWordTokenizer:
    """Word ids of world captions (module docstring), with the Hugging Face call signature."""

    def ids(self, text: str) -> list[int]:
        """The word ids of ``text`` and EOS, unpadded."""
        return [_WORD_IDS.get(word, UNK_ID) for word in _LETTERS.findall(text.lower())] + [EOS_ID]

    def __call__(
        self,
        texts: list[str],
        *,
        max_length: int,
        add_special_tokens: bool = True,
        padding: str = "max_length",
        truncation: bool = True,
        return_attention_mask: bool = True,
        return_tensors: str = "pt",
    ) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask``, both ``(B, max_length)`` int64 (EOS kept when truncating)."""
        if not (add_special_tokens and padding == "max_length" and truncation and return_tensors == "pt"):
            raise ValueError("WorldWordTokenizer only pads to max_length, truncates, appends EOS and returns torch")
        input_ids = torch.full((len(texts), max_length), PAD_ID, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.ids(text)
            if len(ids) > max_length:
                ids = ids[: max_length - 1] + [EOS_ID]
            input_ids[row, : len(ids)] = torch.tensor(ids)
        out = {"input_ids": input_ids}
        if return_attention_mask:
            out["attention_mask"] = (input_ids != PAD_ID).long()
        return out
