"""``multipart/related`` (RFC 2387) written as a stream: one part at a time,
each file read in chunks, so a response never holds a study in memory.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path

CHUNK = 256 * 1024


def new_boundary() -> str:
    return secrets.token_hex(16)


def content_type(boundary: str, part_type: str, transfer_syntax: str | None = None) -> str:
    """The response's Content-Type (PS3.18 §8.7.3.1)."""
    value = f'multipart/related; type="{part_type}"; boundary={boundary}'
    if transfer_syntax:
        value += f"; transfer-syntax={transfer_syntax}"
    return value


def part_head(boundary: str, part_type: str, location: str | None = None) -> bytes:
    head = f"--{boundary}\r\nContent-Type: {part_type}\r\n"
    if location:
        head += f"Content-Location: {location}\r\n"
    return (head + "\r\n").encode("latin-1")


def closing(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode("latin-1")


def file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fp:
        while chunk := fp.read(CHUNK):
            yield chunk


def stream_parts(
    boundary: str, parts: Iterable[tuple[str, str | None, Iterable[bytes]]]
) -> Iterator[bytes]:
    """The body: for each (part type, Content-Location, chunks) a part."""
    for part_type, location, chunks in parts:
        yield part_head(boundary, part_type, location)
        yield from chunks
        yield b"\r\n"
    yield closing(boundary)
