"""Caption processing for fine-tuning: kohya sd-scripts' caption options, per item and seeded.

``CaptionProcessor(caption, rng, epoch)`` applies, in this order (kohya ``process_caption``,
``library/train_util.py``; differences marked *):

1. caption dropout: every ``caption_dropout_every_n_epochs``-th epoch (``(epoch + 1) % n == 0``:
   epochs count from 0 here, from 1 in kohya), else with probability ``caption_dropout``, the
   result is ``""`` (prefix and suffix included, as in kohya);
2. lines: with ``wildcards`` one random line of a multi-line caption, else the first line;
3. wildcards: each ``{a|b|c}`` becomes one of its options (``{{`` / ``}}`` are literal braces);
4. tags, when a tag option is on (``shuffle_tags``, ``tag_dropout`` > 0, ``tag_replace``, or
   ``keep_tokens_separator`` found in the caption): split on ``separator``, strip spaces, drop
   empty tags* (before counting ``keep_tokens``); kept tags are the text before ``keep_tokens_separator`` (and after a second one,
   kept at the end) or else the first ``keep_tokens`` tags; ``tag_replace`` on every tag* (``""``
   removes it); the other tags are shuffled, then each is dropped with probability
   ``tag_dropout``; rejoined with ``", "``. Without a tag option the caption is left as it is;
5. ``prefix + caption + suffix``, verbatim*, so a trigger word is never shuffled or dropped
   (kohya joins them with a space before step 1, so they go through the tag operations). When
   the caption is empty the two are joined with ``", "`` without their facing separators.

All randomness comes from the ``random.Random`` passed in: seed it per item with
``item_rng(seed, epoch, index)`` and the result does not depend on workers, ranks or call order.
"""

from __future__ import annotations

import hashlib
import logging
import operator
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch.utils.data import Dataset

from ldm.util import ConfigError

logger = logging.getLogger(__name__)

# kohya sd-scripts option names -> ours, for the error message of an unknown key
KOHYA_NAMES = {
    "caption_prefix": "prefix",
    "caption_suffix": "suffix",
    "caption_separator": "separator",
    "shuffle_caption": "shuffle_tags",
    "caption_tag_dropout_rate": "tag_dropout",
    "caption_dropout_rate": "caption_dropout",
    "enable_wildcard": "wildcards",
}
_WILDCARD = re.compile(r"\{([^}]+)\}")


def item_rng(seed: int, epoch: int, index: int) -> random.Random:
    """A generator for one item in one epoch: the same for the same (seed, epoch, index) in any
    process, independent of how items are spread over DataLoader workers and ranks."""
    key = f"ldm.captions:{operator.index(seed)}:{operator.index(epoch)}:{operator.index(index)}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def _check_rate(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ConfigError(
            f"captions.{name} must be a probability in [0, 1], got {value!r}; "
            f"e.g. {name}: 0.1 (or 0 to turn it off)"
        )
    return float(value)


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"captions.{name} must be an int >= 0, got {value!r}; 0 turns it off")
    return int(value)


def _check_text(name: str, value: Any, allow_none: bool = False, nonempty: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or (nonempty and not value):
        what = "a non-empty string" if nonempty else "a string"
        raise ConfigError(
            f"captions.{name} must be {what}{' or null' if allow_none else ''}, got {value!r}"
        )
    return value


def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"captions.{name} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class CaptionProcessor:
    """kohya-style caption augmentation; see the module docstring for the order of operations.
    Picklable (runs inside DataLoader workers); values are checked at construction."""

    prefix: str = ""
    suffix: str = ""
    separator: str = ","
    shuffle_tags: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str | None = None
    tag_dropout: float = 0.0
    caption_dropout: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    wildcards: bool = False
    tag_replace: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalize values in place
        set_(self, "prefix", _check_text("prefix", "" if self.prefix is None else self.prefix))
        set_(self, "suffix", _check_text("suffix", "" if self.suffix is None else self.suffix))
        set_(self, "separator", _check_text("separator", self.separator, nonempty=True))
        sep = _check_text("keep_tokens_separator", self.keep_tokens_separator, True, True)
        if sep is not None and sep == self.separator:
            raise ConfigError(
                f"captions.keep_tokens_separator {sep!r} equals captions.separator; use a "
                "distinct marker such as '|||'"
            )
        set_(self, "keep_tokens_separator", sep)
        set_(self, "shuffle_tags", _check_flag("shuffle_tags", self.shuffle_tags))
        set_(self, "wildcards", _check_flag("wildcards", self.wildcards))
        set_(self, "keep_tokens", _check_count("keep_tokens", self.keep_tokens))
        every = _check_count("caption_dropout_every_n_epochs", self.caption_dropout_every_n_epochs)
        set_(self, "caption_dropout_every_n_epochs", every)
        set_(self, "tag_dropout", _check_rate("tag_dropout", self.tag_dropout))
        set_(self, "caption_dropout", _check_rate("caption_dropout", self.caption_dropout))
        replace = self.tag_replace if self.tag_replace is not None else {}
        if not isinstance(replace, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in replace.items()
        ):
            raise ConfigError(
                f"captions.tag_replace must map tags to tags (strings), got {replace!r}; "
                'e.g. tag_replace: {"1girl": "a woman"}'
            )
        set_(self, "tag_replace", {k.strip(): v.strip() for k, v in replace.items()})

    @classmethod
    def known_keys(cls) -> list[str]:
        """The config keys this processor takes."""
        return [f.name for f in fields(cls)]

    @property
    def is_random(self) -> bool:
        """True when the same caption can come out differently (per item or per epoch)."""
        return bool(
            self.caption_dropout
            or self.caption_dropout_every_n_epochs
            or self.tag_dropout
            or self.shuffle_tags
            or self.wildcards
        )

    @property
    def is_identity(self) -> bool:
        """True when every caption comes out unchanged except for its first line."""
        return not (
            self.is_random
            or self.prefix
            or self.suffix
            or self.tag_replace
            or self.keep_tokens_separator
        )

    def __call__(self, caption: str, rng: random.Random, epoch: int = 0) -> str:
        """The processed caption; all draws come from ``rng``."""
        if not isinstance(caption, str):
            raise TypeError(f"a caption must be a string, got {type(caption).__name__}")
        dropped = self.caption_dropout > 0 and rng.random() < self.caption_dropout
        every = self.caption_dropout_every_n_epochs
        if dropped or (every > 0 and (epoch + 1) % every == 0):
            return ""
        if self.wildcards:
            caption = self._wildcards(rng.choice(caption.split("\n")), rng)
        else:
            caption = caption.split("\n")[0]
        caption = self._tags(caption, rng)
        if caption:
            return self.prefix + caption + self.suffix
        strip = self.separator + " \t"
        return ", ".join(p for p in (self.prefix.rstrip(strip), self.suffix.lstrip(strip)) if p)

    @staticmethod
    def _wildcards(caption: str, rng: random.Random) -> str:
        """Each ``{a|b}`` -> one option; ``{{`` and ``}}`` stay literal braces (kohya)."""
        left, right = "\x00", "\x01"  # placeholders for escaped braces
        caption = caption.replace("{{", left).replace("}}", right)
        caption = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
        return caption.replace(left, "{").replace(right, "}")

    def _clean(self, tags: list[str]) -> list[str]:
        """``tag_replace`` on each tag; tags replaced by ``""`` are removed."""
        return [r for r in (self.tag_replace.get(t, t) for t in tags) if r]

    def _split(self, text: str) -> list[str]:
        """Tags of ``text``: split on the separator, stripped, empty ones dropped."""
        return [t for t in (t.strip() for t in text.split(self.separator)) if t]

    def _tags(self, caption: str, rng: random.Random) -> str:
        marker = self.keep_tokens_separator
        has_marker = marker is not None and marker in caption
        if not (self.shuffle_tags or self.tag_dropout > 0 or self.tag_replace or has_marker):
            return caption
        tail: list[str] = []
        if has_marker:
            head_text, flex_text = caption.split(marker, 1)
            if marker in flex_text:
                flex_text, tail_text = flex_text.split(marker, 1)
                tail = self._clean(self._split(tail_text))
            head, flex = self._clean(self._split(head_text)), self._clean(self._split(flex_text))
        else:
            tags = self._split(caption)
            head, flex = (
                self._clean(tags[: self.keep_tokens]),
                self._clean(tags[self.keep_tokens :]),
            )
        if self.shuffle_tags:
            rng.shuffle(flex)
        if self.tag_dropout > 0:
            flex = [t for t in flex if rng.random() >= self.tag_dropout]
        return ", ".join(head + flex + tail)


def caption_processor_from_config(cfg: Mapping[str, Any] | None) -> CaptionProcessor | None:
    """A processor from a ``captions:`` mapping; None when there is none or it changes nothing.

    Raises ConfigError (a ValueError) for an unknown key, listing the known ones."""
    if cfg is None:
        return None
    if not isinstance(cfg, Mapping):
        raise ConfigError(
            f"captions must be a mapping of options ({', '.join(CaptionProcessor.known_keys())}), "
            f"got {type(cfg).__name__}"
        )
    known = CaptionProcessor.known_keys()
    unknown = [str(k) for k in cfg if k not in known]
    if unknown:
        hints = [f"{k} -> {KOHYA_NAMES[k]}" for k in unknown if k in KOHYA_NAMES]
        hint = f" (kohya names here: {', '.join(hints)})" if hints else ""
        raise ConfigError(f"captions: unknown key(s) {unknown}{hint}; the known keys are {known}")
    values = dict(cfg)
    if values.get("tag_replace") is not None:
        values["tag_replace"] = dict(values["tag_replace"])  # OmegaConf DictConfig -> dict
    processor = CaptionProcessor(**values)
    if processor.is_identity:
        return None
    logger.info("captions: %s", processor)
    return processor


class CaptionedDataset(Dataset):
    """A map-style data set with ``item[caption_key]`` processed by a ``CaptionProcessor`` seeded
    by ``item_rng(seed, epoch, index)``; other attributes come from the wrapped data set.

    ``set_epoch`` writes the epoch to shared memory, so DataLoader workers (persistent ones
    included) see it; call it before iterating each epoch. An item without the caption key (a
    folder without captions) is processed as ``""`` (e.g. ``prefix`` as the instance prompt).
    """

    def __init__(
        self,
        dataset: Any,
        captions: Mapping[str, Any] | CaptionProcessor | None,
        caption_key: str = "caption",
        seed: int = 0,
    ) -> None:
        if isinstance(captions, CaptionProcessor):
            processor = captions
        else:
            processor = caption_processor_from_config(captions) or CaptionProcessor()
        self.dataset, self.processor = dataset, processor
        self.caption_key, self.seed = caption_key, operator.index(seed)
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()

    @property
    def epoch(self) -> int:
        """The epoch captions are drawn for."""
        return int(self._epoch)

    @property
    def random_captions(self) -> bool:
        """True when captions change between draws: caching text encodings would freeze one."""
        return self.processor.is_random

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch (here, in workers, and in the wrapped data set if it has set_epoch)."""
        self._epoch.fill_(operator.index(epoch))
        inner = getattr(self.dataset, "set_epoch", None)
        if callable(inner):
            inner(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])  # a copy: the wrapped data set may cache its items
        caption = item.get(self.caption_key)
        if caption is None:
            caption = ""
        elif not isinstance(caption, str):
            raise TypeError(
                f"item {index}: {self.caption_key!r} must be a caption string to process, got "
                f"{type(caption).__name__}; set caption_key to the key of the text"
            )
        epoch = self.epoch
        item[self.caption_key] = self.processor(caption, item_rng(self.seed, epoch, index), epoch)
        return item

    def __getattr__(self, name: str) -> Any:
        """Attributes of the wrapped data set (``image_key``, ``deterministic``, ...)."""
        dataset = self.__dict__.get("dataset")
        if dataset is None or name.startswith("__"):  # unpickling: no dataset yet
            raise AttributeError(name)
        return getattr(dataset, name)
