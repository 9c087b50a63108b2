"""The protobuf bodies kubectl sends for built-in kinds (`kubectl create ns NAME`).

Kubernetes wraps a protobuf object in an envelope: the bytes `k8s\\0`, then a message with
the type (apiVersion, kind) and the object's own bytes. Only what `kubectl create namespace`
fills in is decoded here, the object's metadata (name, namespace, labels, annotations);
a body with anything else is refused rather than stored half-read.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = ["ProtobufError", "decode"]

MAGIC = b"k8s\x00"


class ProtobufError(ValueError):
    pass


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data):
            raise ProtobufError("truncated varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise ProtobufError("varint too long")


def _fields(data: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value): an int for varints, bytes for the rest."""
    at = 0
    while at < len(data):
        tag, at = _varint(data, at)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, at = _varint(data, at)
            yield number, wire, value
        elif wire == 2:
            size, at = _varint(data, at)
            if at + size > len(data):
                raise ProtobufError("truncated field")
            yield number, wire, data[at : at + size]
            at += size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            yield number, wire, data[at : at + size]
            at += size
        else:
            raise ProtobufError(f"unsupported wire type {wire}")


def _text(value: Any) -> str:
    if not isinstance(value, bytes):
        raise ProtobufError("expected a string field")
    return value.decode("utf-8")


def _map_entry(value: bytes) -> tuple[str, str]:
    found = {n: _text(v) for n, _, v in _fields(value)}
    return found.get(1, ""), found.get(2, "")


#: ObjectMeta fields kept: 1 name, 3 namespace, 11 labels, 12 annotations; the others are
#: server-set (uid, resourceVersion, ...) or not used here (2 generateName is refused)
def _metadata(data: bytes) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for number, _, value in _fields(data):
        if number in (1, 3) and value:
            meta["name" if number == 1 else "namespace"] = _text(value)
        elif number in (11, 12):
            key, text = _map_entry(value)
            meta.setdefault("labels" if number == 11 else "annotations", {})[key] = text
        elif number == 2 and value:
            raise ProtobufError("metadata.generateName is not supported")
    return meta


def decode(body: bytes) -> dict[str, Any]:
    """The object in a Kubernetes protobuf envelope, as JSON would have carried it."""
    if not body.startswith(MAGIC):
        raise ProtobufError("not a Kubernetes protobuf envelope")
    api_version = kind = ""
    raw = b""
    for number, _, value in _fields(body[len(MAGIC) :]):
        if number == 1:
            for n, _, v in _fields(value):
                if n == 1:
                    api_version = _text(v)
                elif n == 2:
                    kind = _text(v)
        elif number == 2:
            raw = value
        elif number == 3 and value:
            raise ProtobufError(f"content encoding {_text(value)!r} is not supported")
    obj: dict[str, Any] = {"apiVersion": api_version, "kind": kind, "metadata": {}}
    for number, _, value in _fields(raw):
        if number == 1:
            obj["metadata"] = _metadata(value)
        elif number == 2 and kind == "Namespace":
            # NamespaceSpec: only finalizers (1), which a namespace here does not use
            if any(n != 1 and v for n, _, v in _fields(value)):
                raise ProtobufError("unsupported Namespace spec field")
        elif number == 3 and kind == "Namespace":
            continue  # status: set by the server
        elif value and any(v for _, _, v in _fields(value)):
            raise ProtobufError(f"{kind or 'the object'}: only metadata can be read from protobuf")
    return obj
