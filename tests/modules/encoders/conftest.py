"""Fixtures for the encoder tests: an offline Hugging Face CLIPTokenizer and the reference key lists."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from ldm.modules.encoders.tokenizer import default_bpe_path

DATA = Path(__file__).resolve().parents[2] / "data"


def write_hf_vocab(directory: Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` as openai/clip-vit-large-patch14 ships them."""
    lines = gzip.open(default_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    # GPT-2 byte table, written here independently of ldm's implementation
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


@pytest.fixture(scope="session")
def hf_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """transformers.CLIPTokenizer built from local files only (no hub access)."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = write_hf_vocab(tmp_path_factory.mktemp("clip_vocab"))
    return CLIPTokenizer(str(vocab_file), str(merges_file))


def read_tsv(name: str, prefix: str) -> dict[str, tuple[int, ...]]:
    """Reference ``key -> shape`` with ``prefix`` removed from every key."""
    out = {}
    for line in (DATA / name).read_text().splitlines()[1:]:
        key, shape = line.split("\t")
        assert key.startswith(prefix), key
        out[key[len(prefix) :]] = tuple(int(s) for s in shape.split("x")) if shape else ()
    return out


@pytest.fixture(scope="session")
def tsv_keys():
    """``tsv_keys(name, prefix)`` -> reference ``key -> shape`` from ``tests/data``."""
    return read_tsv
