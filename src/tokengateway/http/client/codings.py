"""Content codings, for the data path: reading the usage in a gzip or deflate answer.

The client passes a content coding on as it is (it is the client's business); these read
one for the gateway's own eyes only.
"""

from __future__ import annotations

import zlib

__all__ = ["content_decoder", "decode_content"]

#: Content codings `decode_content` reads (for the usage in an answer, never for the client).
_CONTENT_CODINGS = {"gzip": 31, "x-gzip": 31, "deflate": 15}


def content_decoder(coding: str) -> zlib._Decompress | None:
    """An incremental decoder for a gzip or deflate content coding; None for another."""
    wbits = _CONTENT_CODINGS.get(coding.strip().lower())
    return None if wbits is None else zlib.decompressobj(wbits)


def decode_content(coding: str, data: bytes, limit: int) -> bytes | None:
    """`data` decoded from a gzip or deflate content coding, at most `limit` bytes of it; None
    when the coding is another, the data do not decode, or they decode beyond `limit`."""
    wbits = _CONTENT_CODINGS.get(coding.strip().lower())
    if wbits is None:
        return None
    try:
        decoder = zlib.decompressobj(wbits)
        out = decoder.decompress(data, limit + 1)
    except zlib.error:
        return None
    return None if len(out) > limit or decoder.unconsumed_tail else out
