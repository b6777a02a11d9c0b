"""A structural check of CBOR bytes before ``cbor2`` decodes them: the plain subset we write.

``cbor2`` decodes every tag it knows, shared references (tags 28/29) among them, and makes
arrays used as map keys into tuples. Together they let ~180 hostile bytes describe a DAG whose
tuple keys take 2^n steps to hash (a freeze, not an exception: the size bound does not bound the
work). Our messages use none of that, so this one pass over the header bytes -- no values are
built -- refuses anything else first:

* map keys are text or integers;
* no tags but 2 and 3 (bignums: an integer, whose range each field then checks);
* definite lengths only (our encoder never writes indefinite ones), and nesting bounded.

It reads what RFC 8949 section 3 calls the item heads; it is a gate, not a decoder.
"""

from __future__ import annotations

__all__ = ["MAX_DEPTH", "NotPlain", "check_plain"]

MAX_DEPTH = 16
_BIGNUM_TAGS = frozenset({2, 3})


class NotPlain(ValueError):
    """CBOR outside the plain subset (or not CBOR at all)."""


def _head(data: bytes, pos: int) -> tuple[int, int, int]:
    """(major type, argument, position after the head) of the item at ``pos``."""
    if pos >= len(data):
        raise NotPlain("truncated")
    initial = data[pos]
    major, info = initial >> 5, initial & 0x1F
    pos += 1
    if info < 24:
        return major, info, pos
    if info > 27:  # 28-30 reserved, 31 indefinite length or break
        raise NotPlain("indefinite length or reserved head")
    size = 1 << (info - 24)
    if pos + size > len(data):
        raise NotPlain("truncated")
    return major, int.from_bytes(data[pos : pos + size], "big"), pos + size


def check_plain(data: bytes) -> None:
    """Raise :class:`NotPlain` unless ``data`` is one item of the plain subset, and nothing more."""
    pos = 0
    # each frame: items still to read in an open array or map, and whether the next is a key
    stack: list[list[int]] = [[1, 0]]  # the top level: one item, not a map
    while stack:
        frame = stack[-1]
        if frame[0] == 0:
            stack.pop()
            continue
        frame[0] -= 1
        is_key = frame[1] == 1 and frame[0] % 2 == 1  # a map counts 2 per entry: key first
        major, arg, pos = _head(data, pos)
        if is_key and major not in (0, 1, 3):
            raise NotPlain("a map key that is not text or an integer")
        if major in (2, 3):  # byte or text string: skip its content
            if pos + arg > len(data):
                raise NotPlain("truncated")
            pos += arg
        elif major in (4, 5):
            if len(stack) > MAX_DEPTH:
                raise NotPlain("nested too deep")
            count = arg * (2 if major == 5 else 1)
            if count > len(data) - pos:  # each item takes at least a byte
                raise NotPlain("truncated")
            stack.append([count, 1 if major == 5 else 0])
        elif major == 6:
            if arg not in _BIGNUM_TAGS:
                raise NotPlain(f"tag {arg}")
            major, arg, pos = _head(data, pos)  # the bignum's byte string
            if major != 2 or pos + arg > len(data):
                raise NotPlain("a bignum that is not a byte string")
            pos += arg
    if pos != len(data):
        raise NotPlain("bytes after the item")
