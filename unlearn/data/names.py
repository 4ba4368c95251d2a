"""Finding a concept's name or aliases in text: the one rule of the toolkit (training flags,
evaluation, record checks, SIU's substitution, FMN's prompt tokens).

Case-insensitive, with word boundaries only where the script uses them: a name must not start or
end inside a word of a script written with spaces ("Korvex" is not in "korvexes", nor "Vorn" in
"Vornel"); an edge written in a script without spaces (Han, kana, Thai, Lao, Khmer, Myanmar,
Tibetan) has no boundary to check: "李明" is found in "我是李明。" (Qwen2-VL answering in Chinese).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_UNSPACED = ("\u0e00-\u0fff\u1000-\u109f\u1780-\u17ff\u3005\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf"
             "\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f")  # scripts written without spaces
_SPACED_LETTER = rf"[^\W{_UNSPACED}]"  # a word character of a script written with spaces
_UNSPACED_CHAR = re.compile(rf"[{_UNSPACED}]")


def _name_regex(name: str) -> str:
    name = name.strip()
    left = "" if _UNSPACED_CHAR.match(name[0]) else rf"(?<!{_SPACED_LETTER})"
    right = "" if _UNSPACED_CHAR.match(name[-1]) else rf"(?!{_SPACED_LETTER})"
    return left + re.escape(name) + right


def _names(names: Iterable[str]) -> list[str]:
    """Distinct non-blank names, longest first ("Oskel Brin Tavo" before "Oskel Brin")."""
    return sorted({n for n in names if n.strip()}, key=lambda n: (-len(n), n))


def name_pattern(names: Iterable[str]) -> re.Pattern:
    """One pattern for all ``names`` (the longest wins at a position), e.g. to substitute them."""
    return re.compile("|".join(_name_regex(n) for n in _names(names)) or r"(?!)", re.IGNORECASE)


def name_spans(text: str, names: Iterable[str]) -> list[tuple[int, int]]:
    """Character spans of every occurrence of every name in ``text`` (overlapping ones included), sorted."""
    return sorted({m.span() for n in _names(names) for m in re.finditer(_name_regex(n), text, re.IGNORECASE)})


def names_in(text: str, names: Iterable[str]) -> bool:
    """Whether ``text`` names the concept (any of ``names``)."""
    return name_pattern(names).search(text) is not None
