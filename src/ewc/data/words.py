"""Word lists as language-modelling tasks: one language per task, words as character sequences.

Debian's word lists (``apt-get install wamerican wngerman wfrench wspanish witalian wportuguese
wdutch wswedish``) live in ``/usr/share/dict``; :data:`LANGUAGES` names each one with its file, its
encoding (``swedish`` is ISO-8859-1, the others UTF-8) and the package that installs it.

Reading a list (:func:`read_words`): every line is decoded with the list's encoding (a byte that
does not decode is an error naming the file, and so is a UTF-8 file for a list declared in a
single-byte encoding, which would otherwise decode into other letters), lower-cased (a
capitalised word is the same word: proper nouns and sentence-initial forms do not double the
alphabet), normalised to Unicode NFC (a decomposed "é" and a composed one are the same
character), and kept only if every character is
a letter (``str.isalpha``): English possessives (``AA's``), hyphenated or dotted forms and
abbreviations with digits are dropped. Words longer than ``max_length`` characters are dropped
(long German and Dutch compounds); duplicates left by lower-casing are removed, and the words are
sorted, so a list always gives the same words in the same order.

A word is the token sequence ``[BOS, c_1, ..., c_n, EOS]`` over one character vocabulary shared by
all languages of a run (:class:`CharVocab`: ``PAD`` = 0, ``BOS`` = 1, ``EOS`` = 2, then the
characters in code-point order). The targets are ``c_1, ..., c_n, EOS`` (n + 1 predictions per
word); :func:`encode_batch` right-pads a batch with ``PAD`` and puts the ignore index −100 at BOS and
on the padding of the labels, which are the inputs themselves (a causal LM shifts them: logits at
position t predict labels[t + 1]).

:func:`split_words` draws a language's test, validation and training words from one seeded
permutation, in that order, so the test words do not depend on how many training words are asked
for.
"""

from __future__ import annotations

import codecs
import os
import unicodedata
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "BOS",
    "DICT_DIR",
    "EOS",
    "IGNORE_INDEX",
    "LANGUAGES",
    "PAD",
    "CharVocab",
    "WordList",
    "WordTask",
    "encode_batch",
    "load_languages",
    "read_words",
    "split_words",
]

PAD, BOS, EOS = 0, 1, 2
SPECIAL = 3  # the first character's id
IGNORE_INDEX = -100  # labels that do not count (PyTorch's and Hugging Face's convention)
DICT_DIR = "/usr/share/dict"


@dataclass(frozen=True)
class WordList:
    """Where a language's words are: file name (under the dictionary folder), encoding, package."""

    file: str
    encoding: str
    package: str


LANGUAGES: dict[str, WordList] = {
    "english": WordList("american-english", "utf-8", "wamerican"),
    "german": WordList("ngerman", "utf-8", "wngerman"),
    "french": WordList("french", "utf-8", "wfrench"),
    "spanish": WordList("spanish", "utf-8", "wspanish"),
    "italian": WordList("italian", "utf-8", "witalian"),
    "portuguese": WordList("portuguese", "utf-8", "wportuguese"),
    "dutch": WordList("dutch", "utf-8", "wdutch"),
    "swedish": WordList("swedish", "iso-8859-1", "wswedish"),
}


def read_words(path: str | os.PathLike, encoding: str = "utf-8", max_length: int = 24) -> list[str]:
    """The words of a word-list file: decoded, NFC, lower-cased, letters only, at most
    ``max_length`` characters, unique, sorted (see the module docstring)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"word list {str(path)!r} not found") from None
    except IsADirectoryError:
        raise ValueError(f"word list {str(path)!r} is a directory, not a file") from None
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        raise ValueError(f"unknown encoding {encoding!r} for word list {str(path)!r}") from None
    if codec != "utf-8" and not raw.isascii() and _is_utf8(raw):
        # a single-byte encoding decodes any bytes: a UTF-8 file would lose its non-ASCII words silently
        raise ValueError(f"word list {str(path)!r} is UTF-8, not {encoding} as its language declares")
    try:
        text = raw.decode("utf-8-sig" if codec == "utf-8" else encoding)  # utf-8-sig: a BOM is not a letter
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ValueError(
            f"word list {str(path)!r} is not {encoding} (line {line}: byte {raw[err.start]:#04x})"
        ) from None
    # the whole text at once (neither reaches across a line break)
    lines = unicodedata.normalize("NFC", text.lower()).splitlines()
    words = {w for w in map(str.strip, lines) if 0 < len(w) <= max_length and w.isalpha()}
    if not words:
        raise ValueError(f"word list {str(path)!r} has no word of letters only up to {max_length} characters")
    return sorted(words)


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def language_file(name: str, root: str | os.PathLike = DICT_DIR) -> Path:
    """The word-list file of language ``name`` under ``root`` (a clear error if it is missing)."""
    if name not in LANGUAGES:
        raise ValueError(f"unknown language {name!r}; expected one of {', '.join(LANGUAGES)}")
    path = Path(root) / LANGUAGES[name].file
    if not path.is_file():
        package = LANGUAGES[name].package
        raise FileNotFoundError(
            f"no word list for {name} at {str(path)!r}: install Debian's {package} "
            f"(apt-get install {package}) or point --dict-dir at a folder with a {LANGUAGES[name].file} file"
        )
    return path


class CharVocab:
    """Token ids of characters: ``PAD``, ``BOS``, ``EOS``, then ``chars`` in code-point order."""

    def __init__(self, chars: Sequence[str]):
        chars = sorted(set(chars))
        if any(len(c) != 1 for c in chars):
            raise ValueError("a vocabulary holds single characters")
        self.chars: tuple[str, ...] = tuple(chars)
        self._ids = {c: i + SPECIAL for i, c in enumerate(self.chars)}

    @classmethod
    def of(cls, words: Sequence[str]) -> CharVocab:
        """The vocabulary of every character in ``words``."""
        return cls({c for w in words for c in w})

    def __len__(self) -> int:
        return SPECIAL + len(self.chars)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharVocab) and other.chars == self.chars

    def __hash__(self) -> int:
        return hash(self.chars)

    def encode(self, word: str) -> list[int]:
        """``[BOS, ids of the characters, EOS]``; a character outside the vocabulary is an error."""
        try:
            return [BOS, *(self._ids[c] for c in word), EOS]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} of {word!r} is not in the vocabulary") from None

    def decode(self, ids: Sequence[int]) -> str:
        """The characters of ``ids`` (special tokens and padding skipped)."""
        return "".join(self.chars[i - SPECIAL] for i in ids if i >= SPECIAL)


def encode_batch(words: Sequence[Sequence[int]]) -> dict[str, Tensor]:
    """Encoded words (``CharVocab.encode``) as ``{"input_ids", "position_ids", "labels"}``, each
    ``[N, L]``, right-padded to the longest: labels are the inputs with −100 at BOS and on the
    padding; ``position_ids`` are 0..L−1 in every row (given per sample, so that the Fisher engine's
    per-sample rule covers the position embedding)."""
    if not words:
        raise ValueError("encode_batch needs at least one word")
    length = max(len(w) for w in words)
    ids = torch.full((len(words), length), PAD, dtype=torch.long)
    for i, w in enumerate(words):
        ids[i, : len(w)] = torch.as_tensor(w, dtype=torch.long)
    labels = ids.masked_fill(ids == PAD, IGNORE_INDEX)
    labels[:, 0] = IGNORE_INDEX
    positions = torch.arange(length).expand(len(words), length).contiguous()
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def split_words(
    words: Sequence[str], train: int, val: int, test: int, seed: int = 0, name: str = ""
) -> tuple[list[str], list[str], list[str]]:
    """Disjoint (train, val, test) subsets of ``words``: test, then validation, then training words
    from one permutation seeded by ``seed`` and ``name`` (``train`` = 0: all that are left)."""
    for what, n in (("train", train), ("val", val), ("test", test)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{what} words must be a non-negative integer, got {n!r}")
    need = test + val + max(train, 1)
    if len(words) < need:
        label = f"{name} has" if name else "the list has"
        raise ValueError(f"{label} {len(words)} words, fewer than the {need} the split asks for")
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    order = torch.randperm(len(words), generator=g).tolist()
    picked = [words[i] for i in order]
    rest = picked[test + val :]
    return (rest[:train] if train else rest), picked[test : test + val], picked[:test]


@dataclass
class WordTask:
    """One language: its training, validation and test words, each encoded with the run's vocabulary."""

    name: str
    train: list[list[int]]
    val: list[list[int]]
    test: list[list[int]]
    available: int  # the words the list gave before the split

    def split(self, part: str) -> list[list[int]]:
        """``"train"``, ``"val"`` or ``"test"``."""
        if part not in ("train", "val", "test"):
            raise ValueError(f"unknown split {part!r}; expected train, val or test")
        return getattr(self, part)


def load_languages(
    names: Sequence[str],
    root: str | os.PathLike = DICT_DIR,
    *,
    train: int = 20_000,
    val: int = 1_000,
    test: int = 2_000,
    max_length: int = 24,
    seed: int = 0,
) -> tuple[CharVocab, list[WordTask]]:
    """The vocabulary of every word of the languages ``names`` (all of each list, so no held-out
    word has an unknown character) and one :class:`WordTask` per language, split by ``seed``."""
    if not names:
        raise ValueError("name at least one language")
    if len(set(names)) != len(names):
        raise ValueError(f"a language is named twice in {list(names)}")
    lists = {n: read_words(language_file(n, root), LANGUAGES[n].encoding, max_length) for n in names}
    vocab = CharVocab.of([w for words in lists.values() for w in words])
    tasks = []
    for n, words in lists.items():
        tr, va, te = split_words(words, train, val, test, seed, n)
        encode = vocab.encode
        tasks.append(
            WordTask(n, [encode(w) for w in tr], [encode(w) for w in va], [encode(w) for w in te], len(words))
        )
    return vocab, tasks
