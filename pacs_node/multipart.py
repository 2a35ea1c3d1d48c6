"""multipart/related bodies as DICOMweb carries them: split, written out, streamed.

STOW-RS receives them (:mod:`pacs_node.stow`), WADO-RS answers with them
(:mod:`pacs_node.wado`), and a remote worker both fetches and hands back its
files in them (:mod:`pacs_node.exchange`). A body is split where it lies (a
memory map of the spooled file), never copied whole; a part's headers must
end within ``MAX_PART_HEAD`` bytes.
"""

from __future__ import annotations

import mmap
import re
from email.message import Message
from http import HTTPStatus

#: Bytes copied at a time between a file, a body and the network.
CHUNK = 1 << 20
#: A part's headers end within this many bytes.
MAX_PART_HEAD = 8192
#: A parameter's name in a Content-Type (a quoted value holding "; x=" reads as one more:
#: no boundary RFC 2046 allows and no DICOM type holds a ";").
_PARAMETER_NAME = re.compile(r";\s*([^=;\s]+)\s*=")
#: RFC 2046 5.1.1: these characters, the last not a space; 1 to 70 of them there, up to
#: MAX_BOUNDARY here (Orthanc's DICOMweb plugin sends two UUIDs joined: 73).
MAX_BOUNDARY = 200
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,%d}[0-9A-Za-z'()+_,\-./:=?]"
                       % (MAX_BOUNDARY - 1))


class StowError(Exception):
    """A request that cannot be processed at all: an HTTP status and why."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def media_type(value: str) -> tuple[str, dict[str, str]]:
    """A Content-Type's media type (lower case) and parameters (quotes removed), or
    StowError (400) for a parameter given twice or in RFC 2231's extended form
    (``boundary*=''b``): RFC 9110 5.6.6 has neither, and where readers differ on them a
    proxy and the node would read different boundaries (Python's email parser joins
    ``boundary*0=a; boundary*1=b`` into one; ``boundary*=`` made a request answered 500)."""
    names = [name.lower() for name in _PARAMETER_NAME.findall(value)]
    if len(set(names)) < len(names) or any("*" in name for name in names):
        raise StowError(HTTPStatus.BAD_REQUEST, "a Content-Type parameter is given twice "
                                                "or in RFC 2231's form")
    msg = Message()
    msg["content-type"] = value
    params = {k.lower(): v for k, v in (msg.get_params() or [])[1:]}
    return msg.get_content_type(), params


def boundary_of(params: dict[str, str]) -> bytes:
    """The ``boundary`` parameter of a multipart Content-Type (:func:`media_type`), checked
    against RFC 2046 5.1.1's characters, at most MAX_BOUNDARY of them, or StowError: a
    delimiter of any length or byte would be searched for through every body."""
    boundary = params.get("boundary")
    if not boundary:
        raise StowError(HTTPStatus.BAD_REQUEST, "multipart/related without a boundary")
    if not _BOUNDARY.fullmatch(boundary):
        raise StowError(HTTPStatus.BAD_REQUEST, f"the multipart boundary is not 1-"
                                                f"{MAX_BOUNDARY} of the characters RFC 2046 "
                                                f"allows")
    return boundary.encode("ascii")


def split_parts(body: mmap.mmap | bytes, boundary: bytes):
    """Yield (headers, start, end) for each part of a multipart body.

    ``headers`` maps lower-case header names to values; the part's content is
    ``body[start:end]``.
    """
    delimiter = b"--" + boundary
    pos = body.find(delimiter)
    if pos < 0:
        raise StowError(HTTPStatus.BAD_REQUEST, "the body holds no part (boundary not found)")
    while True:
        pos += len(delimiter)
        if body[pos:pos + 2] == b"--":
            return  # the close delimiter
        head_end = body.find(b"\r\n\r\n", pos, pos + MAX_PART_HEAD)
        if head_end < 0:
            raise StowError(HTTPStatus.BAD_REQUEST, f"a part has no end of headers within "
                                                    f"{MAX_PART_HEAD} bytes")
        headers = {}
        for line in bytes(body[pos:head_end]).decode("latin-1").split("\r\n"):
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        start = head_end + 4
        nxt = body.find(b"\r\n" + delimiter, start)
        if nxt < 0:
            raise StowError(HTTPStatus.BAD_REQUEST, "the last part is not closed by the "
                                                    "boundary")
        yield headers, start, nxt
        pos = nxt + 2


def write_part(body: mmap.mmap | bytes, start: int, end: int, path) -> None:
    """Write ``body[start:end]`` (a part, from :func:`split_parts`) to the file ``path``,
    a megabyte at a time."""
    with open(path, "wb") as f:
        for pos in range(start, end, CHUNK):
            f.write(body[pos:min(pos + CHUNK, end)])


def multipart_files(parts, boundary: str, unreadable=None):
    """A multipart body of files, streamed: ``parts`` gives (path, the part's
    Content-Type). A file that cannot be opened raises OSError, or, with ``unreadable``,
    is left out and ``unreadable(exc)`` told."""
    for path, content_type in parts:
        try:
            f = open(path, "rb")
        except OSError as exc:
            if unreadable is None:
                raise
            unreadable(exc)
            continue
        with f:
            yield f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode(
                "ascii", "replace")
            while chunk := f.read(CHUNK):
                yield chunk
            yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("ascii")
