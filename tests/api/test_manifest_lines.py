"""A streamed manifest is split into the same lines whatever the chunk boundaries (mid-line,
mid-character, a line spanning many chunks)."""

from __future__ import annotations

import random

import pytest

from api.service import stream_lines


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1 << 20])
def test_lines_do_not_depend_on_chunk_boundaries(size: int) -> None:
    rng = random.Random(size)
    text = b"".join(rng.choice([b"a", b"bb", b"\n", "é".encode(), b"xyz\n", b"q" * 500])
                    for _ in range(5000))
    chunks = [text[i:i + size] for i in range(0, len(text), size)]
    expected = text.split(b"\n")
    if expected[-1] == b"":
        expected.pop()
    assert list(stream_lines(chunks)) == [line.decode() for line in expected]
