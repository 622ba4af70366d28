"""Text users type that other people see: display names and uploaded file names.

A name or a file name is shown in the Studio, in contact sheets, reports and listings. Control characters (NUL, escape
sequences, newlines) and the Unicode bidirectional overrides and isolates (which make ``evil‮gpj.exe`` read as
``evilexe.jpg``) have no place there: a name holding one is refused, a file name has them removed.
"""

from __future__ import annotations

import unicodedata

#: the bidirectional embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069) and marks that reorder text
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")
#: the longest uploaded file name kept
MAX_FILENAME_CHARS = 128


def hidden_character(text: str) -> str | None:
    """The first character of ``text`` that is a control character or reorders the text around it (None: none)."""
    for char in text:
        if char in BIDI_CONTROLS or unicodedata.category(char) == "Cc":
            return char
    return None


def clean_filename(name: str, default: str = "image") -> str:
    """``name`` as shown and stored: its last path part, without control and bidirectional characters, at most
    ``MAX_FILENAME_CHARS`` long (``default`` when nothing is left)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    kept = "".join(c for c in base if hidden_character(c) is None).strip()
    return kept[:MAX_FILENAME_CHARS] or default
