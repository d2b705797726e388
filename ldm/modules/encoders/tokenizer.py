"""Offline CLIP byte-level BPE tokenizer (Radford et al. 2021, "Learning Transferable Visual Models").

Reads the BPE merges that ``open_clip_torch`` ships (``bpe_simple_vocab_16e6.txt.gz``), so it never
touches the network. Two flavours reproduce the ids and padding of the tokenizers SD was trained with:

- ``"sd-v1"``: Hugging Face ``CLIPTokenizer`` of ``openai/clip-vit-large-patch14`` (NFC, collapse
  whitespace, lower-case; ``<|startoftext|>`` 49406 ... ``<|endoftext|>`` 49407, padded with 49407).
- ``"sd-v2"``: ``open_clip.tokenize`` (ftfy + HTML unescape, collapse whitespace, lower-case;
  padded with 0).

``add_tokens`` appends new tokens (textual inversion, Gal et al. 2022) with ids from 49408 upward.
A token with n vectors gets n consecutive ids and expands in place to all of them (diffusers'
``<tok>``, ``<tok>_1``, ... convention). It is matched in prompts as a whole before BPE, after the
same cleaning as the text (so case-insensitively), wherever it stands as a word: not inside a
longer run of letters, digits or underscores (transformers' added tokens also match inside words;
A1111 matches whole BPE words). The instances ``get_tokenizer`` shares refuse new tokens: add them
to a private ``copy()``.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import logging
import os
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import regex
import torch

logger = logging.getLogger(__name__)

BOS_ID = 49406  # <|startoftext|>
EOS_ID = 49407  # <|endoftext|>
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
_N_MERGES = 49152 - 256 - 2  # merges used by CLIP (first line of the file is a header)
_BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
_CACHE_LIMIT = 100_000

#: Settings of the two flavours. ``specials`` are the literal strings recognised inside a prompt.
MODES: dict[str, dict[str, Any]] = {
    "sd-v1": {"clean": "hf", "pad_id": EOS_ID, "specials": ("<|startoftext|>", "<|endoftext|>")},
    "sd-v2": {"clean": "open_clip", "pad_id": 0, "specials": ("<start_of_text>", "<end_of_text>")},
}
_MODE_ALIASES = {
    "hf": "sd-v1",
    "v1": "sd-v1",
    "open_clip": "sd-v2",
    "openclip": "sd-v2",
    "v2": "sd-v2",
}

# CLIP's pre-tokenizer: contractions, letter runs, single digits, runs of other non-space symbols.
_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_WHITESPACE = regex.compile(r"\s+")
_GPT2_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


def default_bpe_path() -> str:
    """Path of the CLIP BPE merges file shipped inside the installed ``open_clip`` package."""
    override = os.environ.get("LDM_CLIP_BPE_PATH")
    if override:
        return override
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"CLIP tokenizer: cannot find '{_BPE_NAME}' because the package 'open_clip_torch' is "
            "not installed. Install it (`pip install open_clip_torch`) or set LDM_CLIP_BPE_PATH "
            "to a copy of the file."
        )
    return os.path.join(list(spec.submodule_search_locations)[0], _BPE_NAME)


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable unicode character table of GPT-2/CLIP byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table  # insertion order: printable bytes first, then the remapped ones


@lru_cache
def load_bpe(path: str) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """Vocabulary (token -> id) and merge ranks from a CLIP BPE merges file."""
    lines = gzip.open(path).read().decode("utf-8").split("\n")[1 : _N_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(
            f"CLIP tokenizer: '{path}' gives {len(vocab)} tokens, expected {VOCAB_SIZE}. "
            "Is it CLIP's bpe_simple_vocab_16e6.txt.gz?"
        )
    ranks = {m: i for i, m in enumerate(merges)}
    return vocab, ranks


class CLIPTokenizer:
    """CLIP BPE tokenizer with SD v1 (Hugging Face) or SD v2 (open_clip) cleaning and padding.

    ``tokenizer(texts)`` follows the Hugging Face call convention and returns a dict with
    ``input_ids`` (LongTensor ``[B, max_length]``) and ``attention_mask``; ``tokenize(texts)``
    returns the id tensor directly, like ``open_clip.tokenize``.
    """

    def __init__(
        self,
        mode: str = "sd-v1",
        max_length: int = CONTEXT_LENGTH,
        pad_token_id: int | None = None,
        bpe_path: str | None = None,
    ) -> None:
        mode = _MODE_ALIASES.get(mode, mode)
        if mode not in MODES:
            raise ValueError(
                f"CLIPTokenizer: unknown mode '{mode}'; expected one of {sorted(MODES)} "
                "('sd-v1' = Hugging Face CLIPTokenizer, 'sd-v2' = open_clip.tokenize)."
            )
        self.mode = mode
        self.model_max_length = int(max_length)
        settings = MODES[mode]
        self.pad_token_id = int(settings["pad_id"] if pad_token_id is None else pad_token_id)
        self.bos_token_id, self.eos_token_id = BOS_ID, EOS_ID
        self._clean_kind = settings["clean"]
        self._specials = {s: i for s, i in zip(settings["specials"], (BOS_ID, EOS_ID))}
        self.encoder, self.bpe_ranks = load_bpe(bpe_path or default_bpe_path())
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        specials = "|".join(regex.escape(s) for s in self._specials)
        flags = regex.IGNORECASE if self._clean_kind == "open_clip" else 0
        self._pattern = regex.compile(specials + "|" + _WORD_PATTERN, flags)
        self._special_split = regex.compile("(" + specials + ")")
        self._cache: dict[str, list[int]] = {}
        self.shared = False  # True for the instances get_tokenizer hands out: add_tokens refuses
        self._added: dict[str, list[int]] = {}  # token string -> its ids (n vectors: n ids)
        self._added_names: dict[int, str] = {}  # id -> "<tok>", "<tok>_1", ... (decode)
        self._added_forms: dict[str, str] = {}  # cleaned form matched in prompts -> token
        self._added_pattern: regex.Pattern[str] | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        # pickle the settings and added tokens, not the 49k-entry tables (modules stay small)
        args = (self.mode, self.model_max_length, self.pad_token_id)
        if not self._added:
            return (CLIPTokenizer, args)
        return (CLIPTokenizer, args, {"added": {t: len(i) for t, i in self._added.items()}})

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.add_tokens(state["added"])

    def __deepcopy__(self, memo: dict[int, Any]) -> CLIPTokenizer:
        # a shared instance never changes (apart from its BPE cache): copies of a module share it
        return self if self.shared else self.copy()

    def __copy__(self) -> CLIPTokenizer:
        return self.copy()

    def copy(self) -> CLIPTokenizer:
        """A private tokenizer with the same settings and added tokens (BPE tables shared)."""
        new = object.__new__(CLIPTokenizer)
        new.__dict__.update(self.__dict__)  # the BPE tables and cache are never mutated
        new.shared = False
        new._added = {t: list(ids) for t, ids in self._added.items()}
        new._added_names = dict(self._added_names)
        new._added_forms = dict(self._added_forms)
        return new

    @property
    def vocab_size(self) -> int:
        """Number of ids: 49408 plus the added ones."""
        return len(self.encoder) + len(self._added_names)

    # ------------------------------------------------------------------ added tokens
    @property
    def added_tokens(self) -> dict[str, list[int]]:
        """Added token strings and their ids, in the order they were added."""
        return {t: list(ids) for t, ids in self._added.items()}

    def add_tokens(self, tokens: str | Sequence[str] | Mapping[str, int]) -> dict[str, list[int]]:
        """Add tokens (a string, strings, or ``{token: number of vectors}``); returns their ids."""
        if isinstance(tokens, str):
            tokens = {tokens: 1}
        elif not isinstance(tokens, Mapping):
            tokens = {t: 1 for t in tokens}
        if self.shared:
            raise ValueError(
                "CLIPTokenizer.add_tokens: this instance comes from get_tokenizer() and is shared "
                "by every encoder built with it, so new tokens would leak into all of them. Add "
                "them to a private copy: `encoder.tokenizer = encoder.tokenizer.copy()`."
            )
        forms = dict(self._added_forms)
        for token, n in tokens.items():
            form = self._clean_token(token)
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(f"CLIPTokenizer.add_tokens: '{token}': vectors={n!r}, need >= 1.")
            if token in self._added or form in forms:
                other = forms.get(form, token)
                raise ValueError(
                    f"CLIPTokenizer.add_tokens: '{token}' is already added (as '{other}'); "
                    "call remove_tokens first to replace it."
                )
            if any(s.lower() in form for s in self._specials):
                raise ValueError(
                    f"CLIPTokenizer.add_tokens: '{token}' contains a start/end token string."
                )
            if self.encoder.get(form + "</w>") is not None:
                logger.warning(
                    "CLIPTokenizer: the new token '%s' is also a word of CLIP's vocabulary; "
                    "prompts will use the new token wherever that word appears.",
                    token,
                )
            forms[form] = token
        out = {token: self._assign(token, n) for token, n in tokens.items()}
        self._compile_added()
        return out

    def remove_tokens(self, tokens: str | Iterable[str] | None = None) -> dict[str, list[int]]:
        """Remove added tokens (all when None); returns their former ids. Later ids move down."""
        if tokens is None:
            names = list(self._added)
        else:
            names = [tokens] if isinstance(tokens, str) else list(tokens)
        unknown = [t for t in names if t not in self._added]
        if unknown:
            raise ValueError(
                f"CLIPTokenizer.remove_tokens: {unknown} were never added; added tokens: "
                f"{list(self._added)}."
            )
        removed = {t: self._added[t] for t in names}
        keep = {t: len(ids) for t, ids in self._added.items() if t not in removed}
        self._added, self._added_names, self._added_forms = {}, {}, {}
        for token, n in keep.items():  # renumbered in order: ids stay contiguous after 49407
            self._assign(token, n)
        self._compile_added()
        return removed

    def _assign(self, token: str, n: int) -> list[int]:
        """Give ``token`` the next n ids (names ``tok``, ``tok_1``, ... as diffusers writes them)."""
        ids = list(range(self.vocab_size, self.vocab_size + n))
        self._added[token] = ids
        for k, i in enumerate(ids):
            self._added_names[i] = token if k == 0 else f"{token}_{k}"
        self._added_forms[self._clean_token(token)] = token
        return list(ids)

    def _clean_token(self, token: str) -> str:
        form = self._clean(token).strip() if isinstance(token, str) else ""
        if not form:
            raise ValueError(
                f"CLIPTokenizer.add_tokens: token {token!r} is empty after cleaning; use a "
                "non-empty string such as '<my-style>'."
            )
        return form

    def _compile_added(self) -> None:
        if not self._added_forms:
            self._added_pattern = None
            return
        alternatives = []
        for form in sorted(self._added_forms, key=len, reverse=True):  # longest first
            head = r"(?<!\w)" if regex.match(r"\w", form[0]) else ""
            tail = r"(?!\w)" if regex.match(r"\w", form[-1]) else ""
            alternatives.append(head + regex.escape(form) + tail)
        self._added_pattern = regex.compile("|".join(alternatives))

    # ------------------------------------------------------------------ text -> ids
    def _clean(self, text: str) -> str:
        if self._clean_kind == "open_clip":
            try:
                import ftfy

                text = ftfy.fix_text(text)
            except ImportError:  # ftfy comes with open_clip_torch; degrade gracefully
                logger.warning("ftfy is not installed; SD v2 tokenization skips ftfy.fix_text")
            text = html.unescape(html.unescape(text)).strip()
            return " ".join(text.split()).lower()
        # Hugging Face tokenizers normaliser: NFC, \s+ -> " ", per-character lower-case
        text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
        return "".join(c.lower() for c in text)

    def _bpe(self, word: str) -> list[int]:
        """Greedy lowest-rank merging of one pre-token (Sennrich et al. 2016, BPE)."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        parts = [self.byte_encoder[b] for b in word.encode("utf-8")]
        parts[-1] = parts[-1] + "</w>"
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts[:-1], parts[1:])}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = [self.encoder[p] for p in parts]
        if len(self._cache) < _CACHE_LIMIT:
            self._cache[word] = ids
        return ids

    def _encode_clean(self, text: str) -> list[int]:
        ids: list[int] = []
        # open_clip maps special strings found in the cleaned text to their ids; Hugging Face only
        # does so on the raw text (see ``encode``) and BPE-encodes those that appear after cleaning
        map_specials = self._clean_kind == "open_clip"
        for piece in self._pattern.findall(text):
            special = self._specials.get(piece) if map_specials else None
            if special is not None:
                ids.append(special)
            elif map_specials:
                ids.extend(self._bpe(piece))
            else:  # HF's ByteLevel pre-tokenizer splits each piece again with GPT-2's pattern
                for sub in _GPT2_PATTERN.findall(piece):
                    ids.extend(self._bpe(sub))
        return ids

    def _encode_with_added(self, text: str) -> list[int]:
        """Ids of cleaned text: added tokens as whole units, BPE between them."""
        if self._added_pattern is None:
            return self._encode_clean(text)
        ids: list[int] = []
        start = 0
        for match in self._added_pattern.finditer(text):
            ids.extend(self._encode_clean(text[start : match.start()]))
            ids.extend(self._added[self._added_forms[match.group(0)]])
            start = match.end()
        ids.extend(self._encode_clean(text[start:]))
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without start/end tokens, padding or truncation."""
        if self._clean_kind == "open_clip":
            return self._encode_with_added(self._clean(text))
        # Hugging Face extracts special-token strings from the raw text before normalising
        ids: list[int] = []
        for segment in self._special_split.split(text):
            if segment in self._specials:
                ids.append(self._specials[segment])
            elif segment:
                ids.extend(self._encode_with_added(self._clean(segment)))
        return ids

    def encode_with_specials(self, text: str, max_length: int | None = None) -> list[int]:
        """``[BOS] + ids + [EOS]``, truncated to ``max_length`` keeping EOS last (no padding)."""
        ids = [BOS_ID] + self.encode(text) + [EOS_ID]
        if max_length is not None and len(ids) > max_length:
            ids = ids[:max_length]
            ids[-1] = EOS_ID
        return ids

    def tokenize(
        self, texts: str | Sequence[str], context_length: int | None = None
    ) -> torch.Tensor:
        """Ids of each text, truncated and padded to ``context_length``: LongTensor [B, L]."""
        return self(texts, max_length=context_length)["input_ids"]

    def __call__(
        self,
        text: str | Sequence[str],
        truncation: bool = True,
        max_length: int | None = None,
        padding: bool | str = "max_length",
        return_tensors: str | None = "pt",
        return_length: bool = False,
        return_overflowing_tokens: bool = False,
        return_attention_mask: bool = True,
        add_special_tokens: bool = True,
        **unused: Any,
    ) -> dict[str, Any]:
        """Hugging Face style batch encoding: ``input_ids`` [B, max_length], ``attention_mask``."""
        if unused:
            logger.debug("CLIPTokenizer ignores arguments %s", sorted(unused))
        if return_overflowing_tokens:
            raise ValueError("CLIPTokenizer: return_overflowing_tokens=True is not supported.")
        texts = [text] if isinstance(text, str) else list(text)
        max_length = self.model_max_length if max_length is None else int(max_length)
        rows = []
        for t in texts:
            ids = self.encode_with_specials(t) if add_special_tokens else self.encode(t)
            if truncation and len(ids) > max_length:
                ids = ids[:max_length]
                if add_special_tokens:
                    ids[-1] = EOS_ID
            rows.append(ids)
        if padding is True or padding == "longest":
            target = max((len(r) for r in rows), default=0)
        elif padding == "max_length":
            target = max_length
        elif padding in (False, None, "do_not_pad"):
            target = None
        else:
            raise ValueError(
                f"CLIPTokenizer: padding={padding!r}; expected 'max_length', 'longest'/True "
                "or False/'do_not_pad'."
            )
        masks = [[1] * len(r) for r in rows]
        if target is not None:
            masks = [m + [0] * (target - len(r)) for m, r in zip(masks, rows)]
            rows = [r + [self.pad_token_id] * (target - len(r)) for r in rows]
        out: dict[str, Any] = {"input_ids": rows}
        if return_attention_mask:
            out["attention_mask"] = masks
        if return_length:
            out["length"] = [len(r) for r in rows]
        if return_tensors == "pt":
            if target is None and len({len(r) for r in rows}) > 1:
                raise ValueError(
                    "CLIPTokenizer: rows of different lengths cannot form a tensor; "
                    "pass padding='max_length' or padding='longest'."
                )
            out = {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
        elif return_tensors is not None:
            raise ValueError(f"CLIPTokenizer: return_tensors={return_tensors!r}; use 'pt' or None.")
        return out

    # ------------------------------------------------------------------ ids -> text
    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (padding and, by default, start/end tokens dropped)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        drop = {BOS_ID, EOS_ID, self.pad_token_id} if skip_special_tokens else set()
        pieces: list[str] = []
        run: list[str] = []
        for i in (int(i) for i in ids):
            if i in drop:
                continue
            name = self._added_names.get(i)
            if name is None:
                run.append(self.decoder[i])
                continue
            pieces += [self._decode_bpe(run), name + " "]
            run = []
        pieces.append(self._decode_bpe(run))
        return "".join(pieces).strip()

    def _decode_bpe(self, parts: list[str]) -> str:
        raw = bytearray(self.byte_decoder[c] for c in "".join(parts))
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")


def end_token_positions(tokens: torch.Tensor, vocab_size: int = VOCAB_SIZE) -> torch.Tensor:
    """Index of the end token in each row [B]: the highest id of CLIP's own vocabulary, as CLIP
    pools (Radford et al. 2021); ids added for textual inversion (>= ``vocab_size``) are skipped."""
    own = torch.where(tokens < vocab_size, tokens, torch.zeros_like(tokens))
    return own.argmax(dim=-1)


@lru_cache(maxsize=8)
def get_tokenizer(mode: str = "sd-v1", max_length: int = CONTEXT_LENGTH) -> CLIPTokenizer:
    """Shared tokenizer instance per (mode, max_length); ``.copy()`` it before adding tokens."""
    tokenizer = CLIPTokenizer(mode=mode, max_length=max_length)
    tokenizer.shared = True
    return tokenizer
