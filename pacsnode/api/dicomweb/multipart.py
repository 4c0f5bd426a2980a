"""``multipart/related`` (RFC 2387) as a stream, both ways: a response is
written one part at a time, each file read in chunks, so it never holds a
study in memory; a request body (STOW-RS) is parsed incrementally as it
arrives (:class:`MultipartReader`), part data handed on in pieces.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pacsnode.core.errors import MalformedBody

CHUNK = 1024 * 1024


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
    """The body: for each (part type, Content-Location, chunks) a part.
    Small pieces are gathered up to :data:`CHUNK` bytes, so a study of small
    instances goes out in few writes."""
    pending: list[bytes] = []
    size = 0
    for part_type, location, chunks in parts:
        head = part_head(boundary, part_type, location)
        for piece in itertools.chain((head,), chunks, (b"\r\n",)):
            pending.append(piece)
            size += len(piece)
            if size >= CHUNK:
                yield b"".join(pending)
                pending, size = [], 0
    pending.append(closing(boundary))
    yield b"".join(pending)


# -- reading a request body (STOW-RS) ---------------------------------------------------

MAX_HEADERS = 16 * 1024


@dataclass
class PartStart:
    """A part begins: its headers (names in lower case)."""

    headers: dict[str, str]


@dataclass
class PartData:
    data: bytes


@dataclass
class PartEnd:
    pass


Event = PartStart | PartData | PartEnd


def boundary_of(content_type_value: str) -> tuple[str, dict[str, str]]:
    """The media type and the parameters (names in lower case) of a
    Content-Type header."""
    media, *params = content_type_value.split(";")
    found: dict[str, str] = {}
    for param in params:
        name, _, value = param.strip().partition("=")
        found[name.strip().lower()] = value.strip().strip('"')
    return media.strip().lower(), found


class MultipartReader:
    """An incremental RFC 2046 parser: :meth:`feed` takes the body chunk by
    chunk as it arrives and returns the events it completes; part data is
    handed on as it comes, never gathered. :meth:`finish` raises
    :class:`MalformedBody` unless the closing delimiter was seen."""

    _PREAMBLE, _AFTER_DELIMITER, _HEADERS, _BODY, _DONE = range(5)

    def __init__(self, boundary: str) -> None:
        if not boundary or len(boundary) > 70:
            raise MalformedBody("the multipart boundary must be 1 to 70 characters (RFC 2046)")
        self._delimiter = b"\r\n--" + boundary.encode("latin-1")
        # A delimiter at the very start of the body has no CRLF before it.
        self._buffer = bytearray(b"\r\n")
        self._state = self._PREAMBLE
        self.parts = 0

    @property
    def done(self) -> bool:
        return self._state == self._DONE

    def feed(self, chunk: bytes) -> list[Event]:
        if self._state == self._DONE:
            return []  # the epilogue is ignored
        self._buffer += chunk
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> None:
        if self._state != self._DONE:
            where = "inside a part" if self._state in (self._HEADERS, self._BODY) else "early"
            raise MalformedBody(
                f"the multipart body ends {where}: no closing boundary (truncated, or the "
                "boundary in the Content-Type is not the one in the body)"
            )

    def _step(self, events: list[Event]) -> bool:
        buffer, keep = self._buffer, len(self._delimiter) - 1
        if self._state == self._PREAMBLE:
            index = buffer.find(self._delimiter)
            if index < 0:
                del buffer[: max(0, len(buffer) - keep)]
                return False
            del buffer[: index + len(self._delimiter)]
            self._state = self._AFTER_DELIMITER
            return True
        if self._state == self._AFTER_DELIMITER:
            stripped = bytes(buffer).lstrip(b" \t")  # transport padding
            if len(stripped) < 2:
                return False
            if stripped.startswith(b"--"):
                self._state = self._DONE
                buffer.clear()
                return False
            if not stripped.startswith(b"\r\n"):
                raise MalformedBody("a boundary delimiter is followed by neither CRLF nor --")
            del buffer[: len(buffer) - len(stripped) + 2]
            self._state = self._HEADERS
            return True
        if self._state == self._HEADERS:
            if buffer.startswith(b"\r\n"):
                end, head = 2, b""
            else:
                index = buffer.find(b"\r\n\r\n")
                if index < 0:
                    if len(buffer) > MAX_HEADERS:
                        raise MalformedBody("the headers of a part are longer than 16 KiB")
                    return False
                end, head = index + 4, bytes(buffer[:index])
            if end > MAX_HEADERS:
                raise MalformedBody("the headers of a part are longer than 16 KiB")
            del buffer[:end]
            events.append(PartStart(_headers(head)))
            self.parts += 1
            self._state = self._BODY
            return True
        if self._state == self._BODY:
            index = buffer.find(self._delimiter)
            if index < 0:
                if len(buffer) > keep:
                    events.append(PartData(_take(buffer, len(buffer) - keep)))
                return False
            if index:
                events.append(PartData(_take(buffer, index)))
            events.append(PartEnd())
            del buffer[: len(self._delimiter)]
            self._state = self._AFTER_DELIMITER
            return True
        return False


def _take(buffer: bytearray, count: int) -> bytes:
    """The first ``count`` bytes of ``buffer``, removed from it (one copy)."""
    with memoryview(buffer) as view:
        data = bytes(view[:count])
    del buffer[:count]
    return data


def _headers(head: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    if not head:
        return headers
    for line in head.decode("latin-1").split("\r\n"):
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise MalformedBody("a part header is not 'Name: value'")
        headers[name.strip().lower()] = value.strip()
    return headers
