"""Decode the few Kubernetes protobuf request bodies that real clients send for built-in kinds.

client-go's typed clients (helm's release storage, ``kubectl create namespace/configmap/secret``)
send ``application/vnd.kubernetes.protobuf``. The emulated apiserver answers in JSON (clients
accept it) but must read these bodies. Only ``Secret``, ``ConfigMap`` and ``Namespace`` (with
``ObjectMeta``) are described here; other kinds raise ``UnsupportedKind``.
"""

from __future__ import annotations

import base64
import datetime
from collections.abc import Callable
from typing import Any

MAGIC = b"k8s\x00"


class UnsupportedKind(ValueError):
    pass


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs; varints as ints, length-delimited as bytes."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.append((number, value))
    return out


# A schema maps a field number to (json name, decoder, repeated).
Schema = dict[int, tuple[str, Callable[[Any], Any], bool]]


def _str(value: Any) -> str:
    return bytes(value).decode()


def _b64(value: Any) -> str:
    return base64.b64encode(bytes(value)).decode()


def _int(value: Any) -> int:
    return int(value) - (1 << 64) if int(value) >= 1 << 63 else int(value)


def _bool(value: Any) -> bool:
    return bool(value)


def _time(value: Any) -> str | None:
    seconds = 0
    for number, item in _fields(bytes(value)):
        if number == 1:
            seconds = _int(item)
    if not seconds:  # the zero Time: Go encodes non-pointer times even when unset
        return None
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _map(value_decoder: Callable[[Any], Any]) -> Callable[[Any], tuple[str, Any]]:
    def decode(value: Any) -> tuple[str, Any]:
        key, val = "", value_decoder(b"")
        for number, item in _fields(bytes(value)):
            if number == 1:
                key = _str(item)
            elif number == 2:
                val = value_decoder(item)
        return key, val

    return decode


def _message(schema: Schema) -> Callable[[Any], dict[str, Any]]:
    def decode(value: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for number, item in _fields(bytes(value)):
            if number not in schema:
                continue
            name, decoder, repeated = schema[number]
            decoded = decoder(item)
            if isinstance(decoded, tuple):  # a map entry
                out.setdefault(name, {})[decoded[0]] = decoded[1]
            elif decoded in (None, "", 0, False) and not repeated:
                continue  # Go's zero values are written on the wire but omitted in JSON (omitempty)
            elif repeated:
                out.setdefault(name, []).append(decoded)
            else:
                out[name] = decoded
        return out

    return decode


OWNER_REFERENCE: Schema = {
    1: ("kind", _str, False),
    3: ("name", _str, False),
    4: ("uid", _str, False),
    5: ("apiVersion", _str, False),
    6: ("controller", _bool, False),
    7: ("blockOwnerDeletion", _bool, False),
}
OBJECT_META: Schema = {
    1: ("name", _str, False),
    2: ("generateName", _str, False),
    3: ("namespace", _str, False),
    5: ("uid", _str, False),
    6: ("resourceVersion", _str, False),
    7: ("generation", _int, False),
    8: ("creationTimestamp", _time, False),
    9: ("deletionTimestamp", _time, False),
    10: ("deletionGracePeriodSeconds", _int, False),
    11: ("labels", _map(_str), False),
    12: ("annotations", _map(_str), False),
    13: ("ownerReferences", _message(OWNER_REFERENCE), True),
    14: ("finalizers", _str, True),
}
KINDS: dict[tuple[str, str], Schema] = {
    ("v1", "Secret"): {
        1: ("metadata", _message(OBJECT_META), False),
        2: ("data", _map(_b64), False),
        3: ("type", _str, False),
        4: ("stringData", _map(_str), False),
        5: ("immutable", _bool, False),
    },
    ("v1", "ConfigMap"): {
        1: ("metadata", _message(OBJECT_META), False),
        2: ("data", _map(_str), False),
        3: ("binaryData", _map(_b64), False),
        4: ("immutable", _bool, False),
    },
    ("v1", "Namespace"): {
        1: ("metadata", _message(OBJECT_META), False),
        2: ("spec", _message({1: ("finalizers", _str, True)}), False),
        3: ("status", _message({1: ("phase", _str, False)}), False),
    },
}


def decode(body: bytes) -> dict[str, Any]:
    """Decode a ``k8s\\x00``-prefixed protobuf object into its JSON form."""
    if not body.startswith(MAGIC):
        raise ValueError("not a Kubernetes protobuf envelope")
    type_meta: dict[str, str] = {}
    raw = b""
    for number, item in _fields(body[len(MAGIC) :]):
        if number == 1:
            type_meta = {{1: "apiVersion", 2: "kind"}[n]: _str(v) for n, v in _fields(bytes(item)) if n in (1, 2)}
        elif number == 2:
            raw = bytes(item)
    key = (type_meta.get("apiVersion", ""), type_meta.get("kind", ""))
    if key not in KINDS:
        raise UnsupportedKind(f"{key[1]} ({key[0]})")
    return {"apiVersion": key[0], "kind": key[1], **_message(KINDS[key])(raw)}
