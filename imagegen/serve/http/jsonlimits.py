"""JSON nesting limits, checked without recursion before anything parses the JSON.

Python's ``json`` module (and pydantic after it) recurse once per nesting level: a body of a few
thousand ``[`` raised ``RecursionError``, a 500. ``DepthScanner`` counts the nesting of raw JSON
bytes as they arrive (brackets and braces outside strings, one flat loop over the structural
characters only), so the edge middleware refuses a too-deep body before FastAPI parses it, and
``parse_json_limited`` does the same for JSON sent inside form fields (character registration).
"""

from __future__ import annotations

import json
import re
from typing import Any

from imagegen.serve.errors import ApiError

#: the characters that change the nesting or the string state; everything else is skipped in C
STRUCTURAL = re.compile(rb'[\\"\[\]{}]')


class JsonTooDeep(Exception):
    """The JSON nests deeper than the limit."""

    def __init__(self, max_depth: int):
        super().__init__(f"the JSON is nested deeper than {max_depth} levels")
        self.max_depth = max_depth


class DepthScanner:
    """Feed JSON bytes in any chunking; ``feed`` raises ``JsonTooDeep`` as soon as the nesting passes ``max_depth``.

    Only the nesting is checked (and the string state it needs): malformed JSON is left to the parser.
    """

    def __init__(self, max_depth: int):
        self.max_depth = max_depth
        self.depth = 0
        self.in_string = False
        #: a backslash inside a string ended the previous chunk: the next byte is escaped
        self.escape_pending = False

    def feed(self, chunk: bytes) -> None:
        skip_to = 0
        if self.escape_pending and chunk:
            self.escape_pending = False
            skip_to = 1
        for match in STRUCTURAL.finditer(chunk, skip_to):
            at = match.start()
            if at < skip_to:
                continue
            char = chunk[at]
            if self.in_string:
                if char == 0x5C:  # backslash: the next byte is escaped
                    if at + 1 < len(chunk):
                        skip_to = at + 2
                    else:
                        self.escape_pending = True
                elif char == 0x22:  # closing quote
                    self.in_string = False
            elif char == 0x22:
                self.in_string = True
            elif char in (0x5B, 0x7B):  # [ {
                self.depth += 1
                if self.depth > self.max_depth:
                    raise JsonTooDeep(self.max_depth)
            elif char in (0x5D, 0x7D):  # ] }
                self.depth -= 1


def check_depth(raw: str | bytes, max_depth: int) -> None:
    """Raise ``JsonTooDeep`` when ``raw`` nests deeper than ``max_depth`` (no parsing, no recursion)."""
    DepthScanner(max_depth).feed(raw.encode() if isinstance(raw, str) else raw)


def parse_json_limited(raw: str | bytes, *, max_depth: int, field: str) -> Any:
    """``raw`` parsed as JSON, or a 422 naming ``field``: too deep (checked first, without recursion) or invalid.

    For JSON inside form fields (``provenance`` and ``card`` of ``POST /v1/characters``); JSON bodies
    get the same depth check from the edge middleware.
    """
    try:
        check_depth(raw, max_depth)
    except JsonTooDeep as exc:
        raise ApiError(422, "json_too_deep", f"{field}: {exc}", field) from None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # ValueError: bad JSON, or an integer of over 4,300 digits
        raise ApiError(422, "invalid_json", f"{field} is not valid JSON: {exc}", field) from None
