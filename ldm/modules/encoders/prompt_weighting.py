"""Emphasis syntax of prompts (the AUTOMATIC1111 convention): text -> (fragment, weight) pairs.

- ``(text:1.3)``: ``text`` with weight 1.3; ``(text)``: x 1.1; ``[text]``: / 1.1. Brackets nest and
  their factors multiply: ``((text))`` is 1.21, ``((text:1.5))`` 1.65.
- ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the literal characters; a bracket that closes nothing
  is literal; a bracket still open at the end applies to the rest of the prompt.
- ``BREAK`` (upper case, a word of its own) ends the current chunk of a long prompt; it is not
  encoded.

The syntax characters are removed: ``"a (cat:1.3)"`` is encoded as the ids of ``"a cat"``.
"""

from __future__ import annotations

import regex

ROUND, SQUARE = 1.1, 1 / 1.1
BREAK_WORD = "BREAK"

# one lexeme per match: an escape, a bracket, a weight closing a round bracket, plain text, ":"
_LEXEME = regex.compile(
    r"""
    (?P<escape>\\[()\[\]\\])
    | (?P<weight>:\s*(?P<number>[+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\))
    | (?P<open>[(\[])
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|[\\:])
    """,
    regex.VERBOSE,
)
_BREAK = regex.compile(r"\s*\bBREAK\b\s*")

Fragment = tuple[str, float]


def parse_prompt(text: str) -> list[list[Fragment]]:
    """Segments of ``text`` split at ``BREAK``, each a list of ``(text, weight)`` fragments.

    Neighbouring fragments of equal weight are merged and empty ones dropped, so a prompt
    without any syntax gives ``[[(text, 1.0)]]`` (its text unchanged).
    """
    items: list[list] = []  # [text, weight]; a BREAK is [None, 1.0]
    open_round: list[int] = []
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for item in items[start:]:
            if item[0] is not None:
                item[1] *= factor

    def add_text(piece: str) -> None:
        for k, part in enumerate(_BREAK.split(piece)):
            if k:
                items.append([None, 1.0])
            items.append([part, 1.0])

    for m in _LEXEME.finditer(text):
        lexeme = m.group(0)
        if m.group("escape"):
            items.append([lexeme[1], 1.0])
        elif m.group("weight") and open_round:
            scale(open_round.pop(), float(m.group("number")))
        elif m.group("weight"):
            add_text(lexeme)  # no open bracket: ":1.3)" is plain text
        elif lexeme == "(":
            open_round.append(len(items))
        elif lexeme == "[":
            open_square.append(len(items))
        elif lexeme == ")" and open_round:
            scale(open_round.pop(), ROUND)
        elif lexeme == "]" and open_square:
            scale(open_square.pop(), SQUARE)
        else:
            add_text(lexeme)
    for start in open_round:
        scale(start, ROUND)
    for start in open_square:
        scale(start, SQUARE)
    return _segments(items)


def _segments(items: list[list]) -> list[list[Fragment]]:
    """Split at BREAK markers; merge equal-weight neighbours; drop empty fragments."""
    segments: list[list[Fragment]] = [[]]
    for piece, weight in items:
        if piece is None:
            segments.append([])
            continue
        if not piece:
            continue
        seg = segments[-1]
        if seg and seg[-1][1] == weight:
            seg[-1] = (seg[-1][0] + piece, weight)
        else:
            seg.append((piece, weight))
    return segments


def plain_prompt(text: str) -> list[list[Fragment]]:
    """The prompt taken literally (emphasis off): one segment, one fragment of weight 1."""
    return [[(text, 1.0)]]
