"""What can go wrong upstream: one exception class per way the gateway answers.

Every failure of an exchange is an `UpstreamError`; its class says what happened and its
`kind`, a stable word, says how the gateway answers (the data path maps it to a status and
an OpenAI error code):

* `UpstreamUnreachable` ("unreachable", 502): connecting failed (refused, no such host);
* `UpstreamTLSError` ("tls", 502): the TLS handshake failed, or the upstream's certificate
  did not verify (expired, unknown authority, another name); never retried in clear;
* `UpstreamBusy` ("busy", 503): every connection to the origin stayed in use;
* `UpstreamTimeout` ("timeout", 504): a timeout ran out (connect, first byte, silence, route);
* `UpstreamInvalid` ("invalid", 502): an answer the client refuses (a 101, a status outside
  100-599, a transfer coding it cannot decode);
* `UpstreamTooLarge` ("too_large", 502): a body read whole over the cap;
* `UpstreamBroken` ("broken", 502, or an error event in a stream): the answer does not
  parse or breaks off; and two kinds of it, `UpstreamClosed` (the upstream closed the
  connection before the answer was complete) and `UpstreamAborted` (the exchange was cut
  short on the gateway's side).

The message (`str(error)`) is what the client reads.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "CLOSED",
    "INCOMPLETE",
    "BadTarget",
    "UpstreamAborted",
    "UpstreamBroken",
    "UpstreamBusy",
    "UpstreamClosed",
    "UpstreamError",
    "UpstreamInvalid",
    "UpstreamTLSError",
    "UpstreamTimeout",
    "UpstreamTooLarge",
    "UpstreamUnreachable",
]

#: The message of an exchange cut short on the gateway's side.
CLOSED = "upstream answer broken: Connection closed"
#: The message of a body the upstream's close cut short.
INCOMPLETE = "upstream closed the connection before the response was complete"


class UpstreamError(Exception):
    """An exchange with the upstream failed; `str(error)` says how, `kind` how to answer.

    Raised only as one of its subclasses; `kind` "failed" (a plain 502) is for a subclass
    of elsewhere that names none."""

    kind: ClassVar[str] = "failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)


class UpstreamUnreachable(UpstreamError):
    """No connection: refused, reset while connecting, no such host, a TLS failure."""

    kind = "unreachable"


class UpstreamTLSError(UpstreamUnreachable):
    """The TLS handshake failed or the certificate did not verify (the message says OpenSSL's
    reason), or TLS settings that could not be loaded refused the connection."""

    kind = "tls"


class UpstreamBusy(UpstreamError):
    """Every connection to the origin (its cap) stayed busy for the connect timeout."""

    kind = "busy"


class UpstreamTimeout(UpstreamError):
    """A timeout ran out: connecting, the first byte, a silence in the body, the route's."""

    kind = "timeout"


class UpstreamInvalid(UpstreamError):
    """An answer the client refuses to pass on: a 101, a status outside 100-599, a transfer
    coding it does not decode."""

    kind = "invalid"


class UpstreamTooLarge(UpstreamError):
    """A body read whole (a non-streamed answer) over `max_response_bytes`."""

    kind = "too_large"

    @classmethod
    def over(cls, label: str, cap: float) -> UpstreamTooLarge:
        """The error for an answer from `label` over `cap` bytes."""
        return cls(
            f"upstream {label} sent an answer over {cap:.0f} bytes, the most the gateway "
            "reads of a non-streamed answer"
        )


class UpstreamBroken(UpstreamError):
    """The answer broke: it does not parse, its head is too long, its transfer coding does
    not decode, or it ended early (the subclasses)."""

    kind = "broken"


class UpstreamClosed(UpstreamBroken):
    """The upstream closed (or reset) the connection before the answer was complete."""


class UpstreamAborted(UpstreamBroken):
    """The exchange was cut short on the gateway's side: `close()`, a cancelled request, a
    stream left unfinished, the client closed."""

    def __init__(self, message: str = CLOSED) -> None:
        super().__init__(message)


class BadTarget(ValueError):
    """A request target (or URL) that cannot go out as it is; nothing was sent."""
