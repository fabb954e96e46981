"""ewc.data.words: word lists read, normalised, split and encoded (tiny lists in tmp_path, and the
real Debian lists that .ci/run installs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ewc.data.words import (
    BOS,
    EOS,
    IGNORE_INDEX,
    LANGUAGES,
    PAD,
    CharVocab,
    encode_batch,
    language_file,
    load_languages,
    read_words,
    split_words,
)


def write(path: Path, lines: list[str], encoding: str = "utf-8") -> Path:
    path.write_bytes("\n".join(lines).encode(encoding) + b"\n")
    return path


def test_read_words_normalises_filters_and_sorts(tmp_path: Path) -> None:
    lines = ["Apple", "apple", "AA's", "e\u0301cole", "école", "x-ray", "abc1", "", "  Zebra  ", "ninechars"]
    words = read_words(write(tmp_path / "list", lines), max_length=8)
    # NFC: the decomposed and composed école are one word; lower-cased duplicates merge; possessives,
    # hyphens and digits are dropped, and so is the 9-letter word; sorted by code point
    assert words == ["apple", "zebra", "école"]
    assert read_words(tmp_path / "list", max_length=9)[-2] == "zebra" and "ninechars" in read_words(
        tmp_path / "list", max_length=9
    )


def test_read_words_decodes_with_the_lists_encoding(tmp_path: Path) -> None:
    path = write(tmp_path / "swedish", ["Öl", "ån", "Åsa"], encoding="iso-8859-1")
    assert read_words(path, "iso-8859-1") == ["ån", "åsa", "öl"]
    with pytest.raises(ValueError, match=r"is not utf-8 \(line 1: byte 0xd6\)"):
        read_words(path, "utf-8")
    with pytest.raises(ValueError, match="unknown encoding 'klingon'"):
        read_words(path, "klingon")
    # ISO-8859-1 decodes any bytes: a UTF-8 list declared ISO-8859-1 would lose å, ä, ö words silently
    utf8 = write(tmp_path / "swedish-utf8", ["fisk", "fågel", "öl"])
    with pytest.raises(ValueError, match="is UTF-8, not iso-8859-1"):
        read_words(utf8, "iso-8859-1")
    assert read_words(write(tmp_path / "ascii", ["fisk", "ko"]), "iso-8859-1") == ["fisk", "ko"]


def test_read_words_byte_order_mark_and_decomposed_capitals(tmp_path: Path) -> None:
    bom = tmp_path / "bom"
    bom.write_bytes(b"\xef\xbb\xbfapple\nzebra\n")
    assert read_words(bom) == ["apple", "zebra"]  # the BOM does not cost the first word
    # a decomposed capital (O + U+0308) and a composed one are the same lower-case word
    assert read_words(write(tmp_path / "umlaut", ["O\u0308sel", "Ösel", "ösel"])) == ["ösel"]


def test_read_words_refusals(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        read_words(tmp_path / "nothing")
    with pytest.raises(ValueError, match="has no word"):
        read_words(write(tmp_path / "digits", ["123", "a's"]))
    with pytest.raises(FileNotFoundError, match=r"apt-get install wswedish"):
        language_file("swedish", tmp_path)
    with pytest.raises(ValueError, match="unknown language 'klingon'"):
        language_file("klingon", tmp_path)


def test_vocabulary_and_batches() -> None:
    vocab = CharVocab.of(["ba", "cé"])
    assert vocab.chars == ("a", "b", "c", "é") and len(vocab) == 7
    assert vocab.encode("abé") == [BOS, 3, 4, 6, EOS] and vocab.decode(vocab.encode("abé")) == "abé"
    with pytest.raises(ValueError, match="character 'z' of 'za' is not in the vocabulary"):
        vocab.encode("za")
    batch = encode_batch([vocab.encode("a"), vocab.encode("cab")])
    assert batch["input_ids"].tolist() == [[BOS, 3, EOS, PAD, PAD], [BOS, 5, 3, 4, EOS]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, 3, EOS, IGNORE_INDEX, IGNORE_INDEX],
        [IGNORE_INDEX, 5, 3, 4, EOS],
    ]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4]] * 2
    # the targets of a word are its characters and EOS: n + 1 per word
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == (1 + 1) + (3 + 1)


def test_split_is_seeded_disjoint_and_keeps_its_test_words() -> None:
    words = [f"w{i}" for i in range(100)]
    train, val, test = split_words(words, 50, 10, 20, seed=3, name="x")
    assert (len(train), len(val), len(test)) == (50, 10, 20)
    assert not (set(train) & set(val)) and not (set(train) & set(test)) and not (set(val) & set(test))
    assert split_words(words, 50, 10, 20, seed=3, name="x") == (train, val, test)
    assert split_words(words, 50, 10, 20, seed=4, name="x")[2] != test  # another seed, another split
    assert split_words(words, 50, 10, 20, seed=3, name="y")[2] != test  # each language its own
    more = split_words(words, 0, 10, 20, seed=3, name="x")  # all the rest for training
    assert more[1:] == (val, test) and len(more[0]) == 70 and more[0][:50] == train
    with pytest.raises(ValueError, match="x has 100 words, fewer than the 131"):
        split_words(words, 100, 11, 20, seed=0, name="x")


def test_load_languages_shares_one_vocabulary(tmp_path: Path) -> None:
    write(tmp_path / LANGUAGES["english"].file, ["cat", "dog", "bird", "fish", "cow", "ant"])
    write(tmp_path / LANGUAGES["swedish"].file, ["katt", "hund", "fågel", "fisk", "ko", "myra"], "iso-8859-1")
    vocab, tasks = load_languages(["english", "swedish"], tmp_path, train=3, val=1, test=2, seed=1)
    assert vocab.chars == tuple(sorted(set("catdogbirdfishcowantkatthundfågelfiskkomyra")))
    assert [t.name for t in tasks] == ["english", "swedish"] and [t.available for t in tasks] == [6, 6]
    swedish = {vocab.decode(w) for w in tasks[1].train + tasks[1].val + tasks[1].test}
    assert swedish == {"katt", "hund", "fågel", "fisk", "ko", "myra"}
    with pytest.raises(ValueError, match="named twice"):
        load_languages(["english", "english"], tmp_path)


def test_the_real_debian_word_lists() -> None:
    """Every language of LANGUAGES reads from /usr/share/dict (.ci/run installs the packages)."""
    for name in LANGUAGES:
        words = read_words(language_file(name), LANGUAGES[name].encoding)
        assert len(words) > 60_000, name
        assert all(w.isalpha() and w == w.lower() for w in words[:: len(words) // 500])
    swedish = set("".join(read_words(language_file("swedish"), "iso-8859-1")))
    assert {"å", "ä", "ö"} <= swedish  # ISO-8859-1 read as such
    vocab, tasks = load_languages(["english", "german"], train=500, val=100, test=200)
    assert "ß" in vocab.chars and "'" not in vocab.chars
    assert [len(t.train) for t in tasks] == [500, 500]
    batch = encode_batch(tasks[1].test)
    assert batch["input_ids"].shape[1] <= 24 + 2 and torch.all(batch["input_ids"][:, 0] == BOS)
