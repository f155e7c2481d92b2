"""Tests for tokenizer.py: exact ids against a fixture produced once by OpenAI CLIP's own tokenizer,
plus the tokenize() contract (sot/eot, padding, truncation, errors) and the vocab checksum."""
import json
import os
import shutil

import pytest
import torch

import tokenizer
from tokenizer import SimpleTokenizer, tokenize

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tokenizer_cases.json")
with open(FIXTURE) as f:
    CASES = json.load(f)["cases"]
SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def tok():
    return tokenizer.default_tokenizer()


def test_fixture_covers_the_intended_cases():
    assert len(CASES) >= 300
    cats = {c["category"] for c in CASES}
    assert cats == {"plain", "unicode", "html", "mojibake", "punct", "numbers", "contractions",
                    "whitespace_special", "long"}
    assert any(c["too_long"]["77"] for c in CASES) and any(c["text"] == "" for c in CASES)


def test_encode_matches_openai(tok):
    bad = [(c["text"], c["encode"], tok.encode(c["text"])) for c in CASES if tok.encode(c["text"]) != c["encode"]]
    assert not bad, f"{len(bad)} mismatches, first: {bad[0]!r}"


@pytest.mark.parametrize("context_length", [77, 17])
def test_tokenize_matches_openai(context_length):
    L = str(context_length)
    got = tokenize([c["text"] for c in CASES], context_length=context_length, truncate=True)
    assert got.dtype == torch.long and got.shape == (len(CASES), context_length)
    for row, c in zip(got.tolist(), CASES):
        want = c["tokens"][L]
        assert row == want + [0] * (context_length - len(want)), c["text"]
    for c in CASES:
        if c["too_long"][L]:
            with pytest.raises(RuntimeError, match=f"too long for context length {context_length}"):
                tokenize(c["text"], context_length=context_length)
        else:
            assert tokenize(c["text"], context_length=context_length)[0].tolist() == got[CASES.index(c)].tolist()


def test_known_ids_and_padding(tok):
    assert (tok.sot_id, tok.eot_id) == (SOT, EOT) and len(tok.encoder) == 49408
    assert tok.encode("a dog") == [320, 1929]
    t = tokenize("a dog", context_length=17)
    assert t.tolist() == [[SOT, 320, 1929, EOT] + [0] * 13]
    assert tokenize("").tolist() == [[SOT, EOT] + [0] * 75]
    assert tokenize("   \t\n").tolist() == tokenize("").tolist()


def test_str_and_list_inputs_agree():
    one = tokenize("man in red", context_length=17)
    many = tokenize(["man in red", "woman", ""], context_length=17)
    assert one.shape == (1, 17) and many.shape == (3, 17)
    assert torch.equal(one[0], many[0])
    assert tokenize([], context_length=17).shape == (0, 17)


def test_truncation_keeps_eot_last():
    text = "the man on the left wearing a red shirt and holding a tennis racket near the net"
    full = tokenize(text)[0]
    n = int((full != 0).sum())
    assert n > 17 and full[n - 1] == EOT
    cut = tokenize(text, context_length=17, truncate=True)[0]
    assert cut[-1] == EOT and torch.equal(cut[:16], full[:16])
    exact = tokenize(text, context_length=n)[0]  # exactly fits: no error, no cut
    assert torch.equal(exact, full[:n])


def test_too_long_error_names_input_and_length():
    text = "a very long referring expression " * 10
    with pytest.raises(RuntimeError) as err:
        tokenize(["short", text], context_length=17)
    msg = str(err.value)
    assert text[:50] in msg and text[:60] not in msg and "17" in msg and "truncate=True" in msg


def test_bad_arguments():
    with pytest.raises(ValueError, match="context_length"):
        tokenize("a", context_length=1)
    with pytest.raises(ValueError, match="list of strings"):
        tokenize(["a", 3])


def test_decode_round_trip(tok):
    for text in ["a man in a red shirt", "antidisestablishmentarianism giraffe", "café über straße"]:
        assert tok.decode(tok.encode(text)) == text + " "
    # every pre-token ends a word ('</w>'), so digits, punctuation and contractions come back space-separated
    assert tok.decode(tok.encode("The 2nd zebra, it's left!")) == "the 2 nd zebra , it 's left ! "
    assert tok.decode([SOT, 320, EOT]) == "<|startoftext|>a <|endoftext|>"
    assert tok.decode(torch.tensor([1929])) == "dog "


def test_bpe_cache_reuses_result(tok):
    first = tok.encode("giraffeneck")
    assert "".join(tok.byte_encoder[b] for b in b"giraffeneck") in tok.cache
    assert tok.encode("giraffeneck") == first


def test_vocab_checksum_failure(tmp_path, monkeypatch):
    bad = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    shutil.copy(tokenizer.VOCAB_PATH, bad)
    with open(bad, "r+b") as f:  # flip one byte in the middle
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.setattr(tokenizer, "VOCAB_PATH", str(bad))
    with pytest.raises(RuntimeError, match="SHA-256") as err:
        SimpleTokenizer()
    assert str(bad) in str(err.value)
    monkeypatch.setattr(tokenizer, "VOCAB_PATH", str(tmp_path / "missing.txt.gz"))
    with pytest.raises(FileNotFoundError, match="missing.txt.gz"):
        SimpleTokenizer()
