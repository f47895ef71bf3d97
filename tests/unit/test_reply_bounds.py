"""guarded._ReplyBounds: valid replies pass whatever the chunking; garbage is cut."""

from __future__ import annotations

import random

import pytest

from django_ocmemcache.client import guarded
from django_ocmemcache.exceptions import BadReply


def _reply() -> bytes:
    big = b"\r\n".join([b"x" * 9000] * 3)  # long, with CR LF inside the value
    parts = [
        b"VALUE a 0 %d\r\n%s\r\n" % (len(big), big),
        b"VALUE b 1 5 42\r\nhello\r\n",
        b"VA 3 f0\r\nabc\r\n",
        b"END\r\n",
    ]
    return b"".join(parts)


@pytest.mark.parametrize("seed", range(20))
def test_valid_reply_in_any_chunks(seed):
    data, rnd = _reply(), random.Random(seed)
    bounds, i = guarded._ReplyBounds(), 0
    while i < len(data):
        n = rnd.randint(1, 5000)
        bounds.feed(data[i : i + n])
        i += n
    assert bounds.skip == 0 and not bounds.line


def test_endless_line_is_cut():
    bounds = guarded._ReplyBounds()
    with pytest.raises(BadReply):
        for _ in range(100):
            bounds.feed(b"x" * 1000 + b"\n")  # LF without CR continues the line


def test_huge_value_is_refused():
    with pytest.raises(BadReply):
        guarded._ReplyBounds().feed(b"VALUE k 0 %d\r\n" % (guarded.MAX_VALUE_BYTES + 1))
