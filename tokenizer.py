"""
CLIP's byte-level BPE tokenizer, written to reproduce OpenAI CLIP's `simple_tokenizer` + `clip.tokenize`
token for token. ETRIS (like CRIS) feeds the referring expression to the frozen CLIP text encoder, so the
ids must be exactly the ones CLIP was trained on: [sot] + BPE(text) + [eot], zero padded to word_len
(17 for RefCOCO/+, 22 for G-Ref).
"""
import gzip
import hashlib
import html
import os
from functools import lru_cache

import ftfy
import regex
import torch

VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
N_MERGES = 49152 - 256 - 2  # CLIP keeps only this many merges of the file: 49408 ids in total

# the special tokens come first so a literal "<|endoftext|>" in the text maps to its id, as in CLIP
TOKEN_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


@lru_cache()
def bytes_to_unicode():
    """Map every byte 0..255 to a printable unicode character, so BPE never sees whitespace/control chars.
    Printable latin-1 bytes map to themselves; the other 68 take code points 256, 257, ... in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    # CLIP's vocabulary lists the printable bytes first, then the remapped ones
    return dict(sorted(table.items(), key=lambda kv: (kv[0] not in printable, kv[0])))


def clean_text(text):
    """CLIP's normalisation: ftfy, HTML entities (unescaped twice for doubly-escaped captions),
    every whitespace run -> one space, lower case."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def read_merges(path):
    """The merge list of the vocab file, after checking it is the exact file CLIP shipped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"BPE vocabulary {path} not found; copy bpe_simple_vocab_16e6.txt.gz from OpenAI CLIP "
            f"(clip/) or open_clip_torch (open_clip/) to that path")
    with open(path, "rb") as f:
        raw = f.read()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != VOCAB_SHA256:
        raise RuntimeError(
            f"BPE vocabulary {path} has SHA-256 {digest}, expected {VOCAB_SHA256}; the file is corrupt or "
            f"not CLIP's bpe_simple_vocab_16e6.txt.gz: replace it with the original")
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1:1 + N_MERGES]]  # line 0 is a version header


class SimpleTokenizer:
    """text <-> CLIP token ids. Ids: 256 byte symbols, the same 256 closing a word ('</w>'),
    one id per merge, then sot (49406) and eot (49407)."""

    def __init__(self, bpe_path=None):
        merges = read_merges(bpe_path or VOCAB_PATH)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {s: i for i, s in enumerate(vocab)}
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.bpe_ranks = {m: r for r, m in enumerate(merges)}
        self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
        self.cache = {SOT: [SOT], EOT: [EOT]}  # special tokens are never split

    def bpe(self, token):
        """Split one byte-encoded pre-token into vocabulary symbols by applying merges lowest rank first."""
        if token in self.cache:
            return self.cache[token]
        word = list(token[:-1]) + [token[-1] + "</w>"]  # the last symbol carries the end-of-word marker
        while len(word) > 1:
            ranked = [(self.bpe_ranks.get(pair, N_MERGES), pair) for pair in zip(word[:-1], word[1:])]
            rank, (first, second) = min(ranked)
            if rank == N_MERGES:  # no adjacent pair is a known merge
                break
            merged, i = [], 0
            while i < len(word):  # merge every occurrence, left to right, without overlaps
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self.cache[token] = word
        return word

    def encode(self, text):
        ids = []
        for piece in TOKEN_PATTERN.findall(clean_text(text)):
            token = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(token))
        return ids

    def decode(self, ids):
        chars = "".join(self.decoder[int(i)] for i in ids)
        text = bytes(self.byte_decoder[c] for c in chars).decode("utf-8", errors="replace")
        return text.replace("</w>", " ")


@lru_cache()
def default_tokenizer():
    return SimpleTokenizer()


def tokenize(texts, context_length=77, truncate=False):
    """str or list of str -> LongTensor [N, context_length] of [sot] + bpe + [eot], zero padded."""
    if isinstance(texts, str):
        texts = [texts]
    if not all(isinstance(t, str) for t in texts):
        raise ValueError(f"tokenize expects a string or a list of strings, got {[type(t).__name__ for t in texts]}")
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 (sot + eot), got {context_length}")
    tok = default_tokenizer()
    result = torch.zeros(len(texts), context_length, dtype=torch.long)  # [N, L]
    for row, text in enumerate(texts):
        ids = [tok.sot_id] + tok.encode(text) + [tok.eot_id]
        if len(ids) > context_length:
            if not truncate:
                shown = text if len(text) <= 50 else text[:50] + "..."
                raise RuntimeError(
                    f"Input {shown!r} is {len(ids)} tokens, too long for context length {context_length}; "
                    f"shorten it or pass truncate=True")
            ids = ids[:context_length - 1] + [tok.eot_id]  # the text encoder pools at eot, so keep it
        result[row, :len(ids)] = torch.tensor(ids)
    return result
