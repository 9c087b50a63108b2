"""The upstream client: HTTP/1.1 on asyncio protocols, parsed by httptools (llhttp).

A general client (aiohttp's was measured at 40-50 us of CPU per proxied request) does much
this gateway never needs: cookies, redirects, decompression, multipart, tracing hooks. This
one sends a request head built with one join, parses the answer with llhttp in C, and hands
the body on as it arrives; it costs a fraction of that. Foreign exceptions are translated
here, once, into an `UpstreamError` subclass whose `kind` the gateway maps to 502, 503 or
504 (`errors`).

Where a request goes is never read from text a client wrote. `Origin` is a backend's
scheme, host, port, base path and credential, parsed once per configuration; `send_to`
takes one and a request target (a path and query starting with `/`, of RFC 3986's
characters only, `%` only as an escape), checks the target and refuses anything else with
`BadTarget`, never re-quoting or re-reading it. `send(method, url, ...)` is a strict
convenience on top (the URL split once and remembered), for tests and benchmarks.

Three timeouts, each settable per backend (`Timeouts`): connecting (TCP and TLS), the first
byte of the answer (its status line and headers: for a non-streamed completion, the whole
generation) and the silence between two chunks of the body. The route's `timeouts.request`
bounds the whole exchange on top. One timer per exchange enforces all of them: it is moved
lazily (when it fires it re-arms itself at the deadline now in force) rather than replaced
at every chunk.

Connections are kept alive in a pool per origin (scheme, host, port), most recently used
first, at most `max_connections` open at once (busy, idle or connecting): a request that
finds them all busy waits for one within its connect timeout, else fails "busy" (503). One
idle for `keepalive` seconds (4: shorter than the 5 s after which uvicorn, and so vLLM,
close an idle connection) is closed. A connection returns to the pool only when its answer
has been parsed to the end, the server did not ask to close it (`Connection: close`,
HTTP/1.0 without keep-alive, a body delimited by the close) and the exchange was not cut
short (a failure, a timeout, `close()`, a cancelled request, an answer that came before the
request was written, a HEAD request). One that the server closed while it sat in the pool,
or whose transport is closing, is dropped, never written to.

A request sent on a *reused* connection that fails before any byte of the answer arrived
(the server's keep-alive timeout raced our request) is sent once more, on a new connection,
only when its method is idempotent (GET, HEAD, OPTIONS, TRACE, PUT, DELETE), as a fresh
exchange under the same deadlines. A POST is never sent twice: the server may have read it
before closing, and a completion run twice costs twice; it fails (502) saying so. (Keeping
idle connections for less time than the upstream does makes that race rare.) A failure on
a new connection, or after any byte of the answer, is never retried.

What an answer may be: 1xx answers (100, 102, 103) are read past, to the final one; a 101
is refused (the client never asks for an upgrade) and its connection closed; a status
outside 100-599 is refused. Hop-by-hop headers, and those the answer's `Connection` header
names, are not passed on. A transfer coding other than chunked is decoded here (gzip,
x-gzip, deflate, with zlib) or refused; a content coding is the client's business and is
passed on as it is, its header with it. A body read whole (`read`) is capped at
`max_response_bytes` (a stream read by `chunks` is not: it is relayed, not kept).

Flow control: reading pauses while more than `READ_HIGH` bytes of the body wait for the
reader, and resumes when it takes them; a large request body is written in slices, waiting
whenever the transport asks us to pause.

What differs from aiohttp, knowingly: an answer to HEAD closes its connection (llhttp cannot
be told that such an answer has no body); a chunk encoding that breaks after the headers is
reported at once (aiohttp waited for the idle timeout); bytes after the end of an answer
close the connection; the route's timeout ending during the body says so (aiohttp called
it a silence); header text goes out as Latin-1, the client's own bytes (aiohttp re-encoded
them UTF-8), and only text beyond Latin-1 as UTF-8; a target is refused rather than
quoted. As with aiohttp: no User-Agent, Accept, Accept-Encoding or Content-Type of our own,
no redirects, no content decompression, no cookies.

The parts, one module each:

* `request`: `Origin`, `check_target`, `Timeouts`, `UpstreamLimits`, the request head;
* `errors`: `UpstreamError` and its subclasses (one per way the gateway answers), `BadTarget`;
* `exchange`: `Exchange`, one try of a request and its answer (its `Stage`, header list,
  body queue and timer), and `UpstreamResponse`, the answer as its reader sees it (made
  directly: a complete answer, for tests and benchmarks);
* `connection`: `Connection`, the asyncio protocol of one connection (the transport, the
  parser's callbacks, whether it may be reused), and `Pool`, the connections to one origin;
* `upstream`: `Upstream`, the client: a pool per origin, a fresh exchange per try;
* `codings`: content codings read for the gateway's own eyes (`decode_content`);
* `tls`: `UpstreamTLS`, verified TLS to an origin (its authorities and the name checked).
"""

from tokengateway.http.client.codings import content_decoder, decode_content
from tokengateway.http.client.connection import MAX_HEAD, Connection, Pool
from tokengateway.http.client.errors import (
    BadTarget,
    UpstreamAborted,
    UpstreamBroken,
    UpstreamBusy,
    UpstreamClosed,
    UpstreamError,
    UpstreamInvalid,
    UpstreamTimeout,
    UpstreamTLSError,
    UpstreamTooLarge,
    UpstreamUnreachable,
)
from tokengateway.http.client.exchange import READ_HIGH, Exchange, Stage, UpstreamResponse
from tokengateway.http.client.request import (
    DEFAULT_LIMITS,
    DEFAULT_TIMEOUTS,
    HOP_BY_HOP,
    Origin,
    Timeouts,
    UpstreamLimits,
    check_target,
)
from tokengateway.http.client.tls import UpstreamTLS, client_context
from tokengateway.http.client.upstream import Upstream

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_TIMEOUTS",
    "HOP_BY_HOP",
    "MAX_HEAD",
    "READ_HIGH",
    "BadTarget",
    "Connection",
    "Exchange",
    "Origin",
    "Pool",
    "Stage",
    "Timeouts",
    "Upstream",
    "UpstreamAborted",
    "UpstreamBroken",
    "UpstreamBusy",
    "UpstreamClosed",
    "UpstreamError",
    "UpstreamInvalid",
    "UpstreamLimits",
    "UpstreamResponse",
    "UpstreamTLS",
    "UpstreamTLSError",
    "UpstreamTimeout",
    "UpstreamTooLarge",
    "UpstreamUnreachable",
    "check_target",
    "client_context",
    "content_decoder",
    "decode_content",
]
