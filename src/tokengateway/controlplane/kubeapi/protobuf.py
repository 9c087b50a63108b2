"""The protobuf bodies kubectl sends for built-in kinds (`kubectl create ns NAME`,
`kubectl create secret generic NAME --from-literal=k=v`).

Kubernetes wraps a protobuf object in an envelope: the bytes `k8s\\0`, then a message with
the type (apiVersion, kind) and the object's own bytes. Decoded here: the object's metadata
(name, namespace, labels, annotations) for every kind, and the fields of a Secret (data,
stringData, type, immutable). A body with anything else is refused rather than stored
half-read.
"""

from __future__ import annotations

import base64
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


def _bytes_entry(value: bytes) -> tuple[str, str]:
    """A `map<string, bytes>` entry, its value in base64 as JSON carries bytes."""
    found = {n: v for n, _, v in _fields(value)}
    key, data = found.get(1, b""), found.get(2, b"")
    if not isinstance(key, bytes) or not isinstance(data, bytes):
        raise ProtobufError("expected a map entry of bytes")
    return key.decode("utf-8"), base64.b64encode(data).decode("ascii")


#: the fields of the kinds whose whole body is decoded: number -> (JSON name, how); `str`
#: a string, `bool` a varint, `strmap` map<string, string>, `bytesmap` map<string, bytes>
_KINDS: dict[str, dict[int, tuple[str, str]]] = {
    "Secret": {
        2: ("data", "bytesmap"),
        3: ("type", "str"),
        4: ("stringData", "strmap"),
        5: ("immutable", "bool"),
    },
}


def _field(obj: dict[str, Any], name: str, how: str, value: Any) -> None:
    if how == "bool":
        if not isinstance(value, int):
            raise ProtobufError(f"{name}: expected a boolean")
        obj[name] = bool(value)
    elif how == "str":
        if value:  # kubectl sends "" for unset; the server's default applies (Opaque)
            obj[name] = _text(value)
    else:
        entry = _map_entry(value) if how == "strmap" else _bytes_entry(value)
        obj.setdefault(name, {})[entry[0]] = entry[1]


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
    fields = _KINDS.get(kind, {})
    for number, _, value in _fields(raw):
        if number == 1:
            obj["metadata"] = _metadata(value)
        elif number in fields:
            _field(obj, *fields[number], value)
        elif number == 2 and kind == "Namespace":
            # NamespaceSpec: only finalizers (1), which a namespace here does not use
            if any(n != 1 and v for n, _, v in _fields(value)):
                raise ProtobufError("unsupported Namespace spec field")
        elif number == 3 and kind == "Namespace":
            continue  # status: set by the server
        elif value and any(v for _, _, v in _fields(value)):
            raise ProtobufError(
                f"{kind or 'the object'}: field {number} cannot be read from protobuf"
            )
    return obj
