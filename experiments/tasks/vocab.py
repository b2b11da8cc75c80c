"""A word-level tokenizer built in code: one shared text vocabulary for every task.

Text is split on whitespace; every word of every template is in :func:`default_words`. Image tiles
are *not* text tokens: at an image position the text id is ``<image>`` and the tile code travels
beside it (see ``uniprobe.experiments.sandbox.sequences``). ``<query>`` marks learnable query positions of
the query-based model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from uniprobe.experiments.tasks import world

SPECIALS: tuple[str, ...] = (
    "<pad>",
    "<bos>",
    "<eos>",
    "<answer>",
    "<boi>",
    "<eoi>",
    "<image>",
    "<query>",
    "<unk>",
)
SYMBOLS: tuple[str, ...] = ("k", "m", "p", "q", "r", "s", "t", "w", "x", "z")
NAMES: tuple[str, ...] = (
    "alice", "bruno", "chloe", "dmitri", "elena", "felix", "greta", "hugo",
    "ines", "jonas", "kira", "lars", "mona", "nils", "olga", "pavel",
)  # fmt: skip
# names never used in pre-training: the characters that knowledge injection teaches later
NEW_NAMES: tuple[str, ...] = ("quinn", "rosa", "sven", "tara", "ugo", "vera", "wim", "yara")
TEMPLATE_WORDS: tuple[str, ...] = (
    "what", "is", "draw", "as", "many", "how", "in", "describe", "of", "and", "whose", "favourite",
    "the", "one", "a", "portrait", "'s", "+", "-", "*", "/", "=", ",", ";", "?",
)  # fmt: skip


def default_words() -> list[str]:
    """Every word the tasks use, in a fixed order (specials first)."""
    words: list[str] = list(SPECIALS) + [str(i) for i in range(10)] + list(TEMPLATE_WORDS)
    words += list(world.COUNT_KINDS) + list(world.COLOURS) + list(world.ATTRIBUTES)
    for attr in world.ATTRIBUTES:
        words += list(world.ATTRIBUTE_VALUES[attr])
    words += list(SYMBOLS) + list(NAMES) + list(NEW_NAMES)
    seen: set[str] = set()
    out = []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


class WordTokenizer:
    """Whitespace word-level tokenizer over a fixed vocabulary.

    ``encode`` raises on an unknown word (naming it) instead of mapping it to ``<unk>``, so a typo in
    a template fails loudly.
    """

    def __init__(self, vocab: Sequence[str] | None = None) -> None:
        self.vocab: list[str] = list(vocab) if vocab is not None else default_words()
        self.index: dict[str, int] = {w: i for i, w in enumerate(self.vocab)}
        for s in SPECIALS:
            if s not in self.index:
                raise ValueError(f"vocabulary lacks special token {s!r}")

    def __len__(self) -> int:
        return len(self.vocab)

    def __getitem__(self, word: str) -> int:
        return self.index[word]

    @property
    def pad_id(self) -> int:
        return self.index["<pad>"]

    def encode(self, text: str) -> list[int]:
        """Whitespace-split ``text`` → ids."""
        out = []
        for w in text.split():
            if w not in self.index:
                near = [v for v in self.vocab if v[:2] == w[:2]][:5]
                raise KeyError(f"word {w!r} is not in the vocabulary (similar: {near})")
            out.append(self.index[w])
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Ids → words joined by spaces."""
        return " ".join(self.vocab[int(i)] for i in ids)

    def to_dict(self) -> dict:
        return {"type": "uniprobe-word-level", "vocab": self.vocab}

    @classmethod
    def from_dict(cls, d: dict) -> WordTokenizer:
        return cls(d["vocab"])

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=0))

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_hf(self):  # -> transformers.PreTrainedTokenizerFast
        """A ``transformers.PreTrainedTokenizerFast`` with the same ids (``tokenizers`` WordLevel model).

        Use it with TransformerLens / ``save_pretrained``; image and query positions still need the
        sandbox model's own ``embed_inputs``.
        """
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.WordLevel(vocab=dict(self.index), unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<bos>",
            eos_token="<eos>",
            pad_token="<pad>",
            unk_token="<unk>",
            additional_special_tokens=[s for s in SPECIALS if s not in ("<bos>", "<eos>", "<pad>", "<unk>")],
            padding_side="left",
        )
