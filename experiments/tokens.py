"""Words ↔ token ids for a loaded model: the one place that maps a word to a token id.

Three kinds of tokenizer reach here: a transformers tokenizer (a local model folder), the sandbox's
word-level tokenizer (one id per vocabulary word), and the tiny test models' ``t0 t1 ...`` tokenizer
(:class:`uniprobe.experiments.models.TinyTokenizer`). Errors are :class:`~uniprobe.hooks.errors.UsageError`
(a ``ValueError``) naming the word. :func:`token_id` gives the single id a word
stands for, without the special tokens a tokenizer adds to prompts; :func:`encode` gives a prompt's
ids, with them; :func:`token_str` the readable form of an id.

Answers and targets (``uniprobe lens --answers``, ``uniprobe patch --target/--foil``, the sweep's
``lens.answers`` and patch pairs, :func:`~uniprobe.experiments.lensing.resolve_answers`) all go
through :func:`parse_token`, so one string has one meaning everywhere: a *word* by default (``"3"``
is the word 3, which the sandbox's arithmetic answers are), a token id only in the explicit form
``"id:3"``. An int given where a word is expected (a sweep label ``3``) is the word of that number.
"""

from __future__ import annotations

from typing import Any

from uniprobe.hooks.errors import UsageError


def _loaded_tokenizer(loaded: Any, what: str) -> Any:
    tok = loaded.tokenizer
    if tok is None:
        raise UsageError(f"model {loaded.spec!r} has no tokenizer: give token ids instead of {what}")
    return tok


def _is_transformers(tok: Any) -> bool:
    return callable(tok) and hasattr(tok, "convert_tokens_to_ids")


def encode(loaded: Any, text: str) -> list[int]:
    """A prompt's token ids, with whatever the tokenizer adds to prompts (a ``<bos>``)."""
    tok = _loaded_tokenizer(loaded, "text")
    if _is_transformers(tok):
        return [int(i) for i in tok(text, add_special_tokens=True)["input_ids"]]
    return [int(i) for i in tok.encode(text)]


def token_id(loaded: Any, word: str) -> int:
    """The one token id ``word`` stands for; an error naming the word when it is not exactly one token."""
    tok = _loaded_tokenizer(loaded, f"the word {word!r}")
    words = getattr(tok, "tok", None)  # the sandbox's word-level vocabulary, one id per word
    if words is not None and hasattr(words, "index"):
        if word not in words.index:
            near = [v for v in words.vocab if v[:2] == word[:2]][:5]
            raise UsageError(f"{word!r} is not a word of {loaded.spec}'s vocabulary (similar: {near})")
        return int(words.index[word])
    if _is_transformers(tok):
        tid = tok.convert_tokens_to_ids(word)
        if tid is not None and tid != getattr(tok, "unk_token_id", None):
            return int(tid)
        pieces: list[int] = []
        for variant in (word, " " + word):  # BPE vocabularies keep a leading-space form of words
            pieces = list(tok.encode(variant, add_special_tokens=False))
            if len(pieces) == 1:
                return int(pieces[0])
        raise UsageError(
            f"{word!r} is not one token of {loaded.spec}'s tokenizer: it encodes to {pieces} "
            f"({tok.convert_ids_to_tokens(pieces)}); use a single-token word, or the form id:N"
        )
    pieces = [int(i) for i in tok.encode(word)]
    if len(pieces) != 1:
        raise UsageError(
            f"{word!r} is {len(pieces)} tokens {pieces}; use a single-token word, or the form id:N"
        )
    return pieces[0]


ID_PREFIX = "id:"


def parse_token(loaded: Any, text: str | int, *, vocab_size: int | None = None) -> int:
    """The token id an answer or target names: ``"id:N"`` is id ``N``; anything else is a word
    (:func:`token_id`; an int is the word of that number, ``3`` → ``"3"``).

    Args:
        vocab_size: the ids ``id:N`` may name are ``0 .. vocab_size - 1`` (default: the model's
            vocabulary, :func:`uniprobe.experiments.models.token_limits`).

    Raises:
        UsageError: ``id:N`` out of range (naming the vocabulary size) or not an integer; a word that
            is not exactly one token.
    """
    if isinstance(text, bool) or not isinstance(text, str | int):
        raise UsageError(f"a token is a word or 'id:N', got {text!r}")
    text = str(text)
    if not text.startswith(ID_PREFIX):
        return token_id(loaded, text)
    raw = text[len(ID_PREFIX) :].strip()
    if vocab_size is None:
        from uniprobe.experiments.models import token_limits

        vocab_size = token_limits(loaded).vocab_size
    ids = f"0..{vocab_size - 1}" if vocab_size else "0 or more"
    if not raw.lstrip("-").isdigit():
        raise UsageError(f"{text!r} is not a token id: write id:N with N an integer in {ids}")
    tid = int(raw)
    if tid < 0 or (vocab_size is not None and tid >= vocab_size):
        size = f"its vocabulary has {vocab_size} tokens, ids {ids}" if vocab_size else "ids are 0 or more"
        raise UsageError(f"{text!r} is outside the vocabulary of {loaded.spec}: {size}")
    return tid


def token_str(loaded: Any, tid: int) -> str:
    """The readable form of token id ``tid`` (``str(tid)`` when the model has no tokenizer)."""
    tok = loaded.tokenizer
    if tok is None:
        return str(tid)
    if hasattr(tok, "convert_ids_to_tokens"):
        return str(tok.convert_ids_to_tokens([int(tid)])[0])
    return str(tok.decode([int(tid)]))
