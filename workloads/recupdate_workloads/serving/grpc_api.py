"""The recommender's gRPC API, ``recupdate.v1.Recommender``, served by Ray Serve's gRPC proxy beside HTTP.

Why it exists: through Serve's HTTP proxy the replica fetches every request body back from the proxy (an actor
lookup and a call), which costs more than the handler (docs/serving.md). Serve's gRPC proxy sends the request
with the call. Same handler, same validation and limits as ``POST /recommend`` and ``POST /recommend/batch``.

The messages are built here from a ``FileDescriptorProto`` (no protoc step); ``recommender.proto`` beside this
module is the same definition as text, for clients in other languages (``proto_text()`` renders it, and a
test keeps the two equal). Serve's proxy registers the service through ``add_RecommenderServicer_to_server``
(``grpc_options.grpc_servicer_functions``: contract.serve.grpc_options) and routes each method to the deployment
method of the same name (serving.deployment). The proxy passes the request's bytes through unparsed; the
replica parses them (``handle_recommend``), so a message over the limit is refused before it is parsed.

Errors are gRPC status codes with the HTTP API's messages: ``INVALID_ARGUMENT`` (HTTP's 422),
``RESOURCE_EXHAUSTED`` (HTTP's 413: a batch over its limit, or a message over its size limit), ``UNAVAILABLE``
(HTTP's 503: no release loaded yet).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message
from pydantic import ValidationError

from recupdate_workloads.serving.app import invalid_message
from recupdate_workloads.serving.schema import BATCH_TOO_LARGE, RecommendBatchRequest, RecommendRequest, UnknownClusters

if TYPE_CHECKING:
    from recupdate_workloads.serving.service import RecommenderService

PACKAGE = "recupdate.v1"
SERVICE = "Recommender"
FULL_SERVICE = f"{PACKAGE}.{SERVICE}"
PROTO_FILE = "recupdate/v1/recommender.proto"

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {"string": _F.TYPE_STRING, "int64": _F.TYPE_INT64, "int32": _F.TYPE_INT32, "double": _F.TYPE_DOUBLE}

# (message, [(field, number, type, repeated, oneof)]); a type not in _SCALARS is a message of this package.
_MESSAGES: list[tuple[str, list[tuple[str, int, str, bool, str | None]]]] = [
    ("ClusterRef", [("id", 1, "int64", False, "ref"), ("name", 2, "string", False, "ref")]),
    (
        "RecommendRequest",
        [
            ("user_id", 1, "string", False, None),
            ("recent_clusters", 2, "ClusterRef", True, None),
            ("n", 3, "int32", False, None),
        ],
    ),
    (
        "RecommendedCluster",
        [
            ("id", 1, "int64", False, None),
            ("name", 2, "string", False, None),
            ("score", 3, "double", False, None),
            ("source", 4, "string", False, None),
        ],
    ),
    ("RecommendResponse", [("clusters", 1, "RecommendedCluster", True, None), ("release", 2, "string", False, None)]),
    ("RecommendBatchRequest", [("requests", 1, "RecommendRequest", True, None)]),
    (
        "RecommendBatchResponse",
        [("results", 1, "RecommendResponse", True, None), ("release", 2, "string", False, None)],
    ),
]
#: (method, request message, response message)
METHODS = [
    ("Recommend", "RecommendRequest", "RecommendResponse"),
    ("RecommendBatch", "RecommendBatchRequest", "RecommendBatchResponse"),
]
#: Field comments of the .proto text: what the HTTP API's schema says of the same fields.
_COMMENTS = {
    "ClusterRef": "A cluster by id or by name (names match case- and punctuation-insensitively).",
    "RecommendRequest.user_id": "Optional; empty means none. During a canary analysis its hash picks the release.",
    "RecommendRequest.recent_clusters": "Recent positive clusters, oldest first, newest last; at most 100.",
    "RecommendRequest.n": "How many clusters to return, 1..100; 0 means the default, 10.",
    "RecommendedCluster.score": "Log-probability (model), share (evidence) or popularity share (popular).",
    "RecommendedCluster.source": "What produced this entry: model, evidence or popular.",
    "RecommendResponse.release": "The release that produced every entry of this response.",
    "RecommendBatchRequest.requests": "The contexts, each a RecommendRequest; at most 256 ($RECUPDATE_SERVE_MAX_BATCH).",
    "RecommendBatchResponse.results": "One answer per context, in order.",
}


def file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """The API as a FileDescriptorProto: the one definition both the messages and the .proto text come from."""
    fd = descriptor_pb2.FileDescriptorProto(name=PROTO_FILE, package=PACKAGE, syntax="proto3")
    for name, fields in _MESSAGES:
        m = fd.message_type.add(name=name)
        oneofs: list[str] = []
        for fname, number, ftype, repeated, oneof in fields:
            f = m.field.add(name=fname, number=number, json_name=_json_name(fname))
            f.label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
            if ftype in _SCALARS:
                f.type = _SCALARS[ftype]  # type: ignore[assignment]  # the enum's int
            else:
                f.type = _F.TYPE_MESSAGE
                f.type_name = f".{PACKAGE}.{ftype}"
            if oneof is not None:
                if oneof not in oneofs:
                    oneofs.append(oneof)
                    m.oneof_decl.add(name=oneof)
                f.oneof_index = oneofs.index(oneof)
    s = fd.service.add(name=SERVICE)
    for method, req, resp in METHODS:
        s.method.add(name=method, input_type=f".{PACKAGE}.{req}", output_type=f".{PACKAGE}.{resp}")
    return fd


def _json_name(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(file_descriptor())


def message_class(name: str) -> type[Message]:
    """The generated class of one message of the API (e.g. ``message_class("RecommendRequest")``)."""
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


ClusterRef = message_class("ClusterRef")
RecommendRequestMessage = message_class("RecommendRequest")
RecommendedClusterMessage = message_class("RecommendedCluster")
RecommendResponseMessage = message_class("RecommendResponse")
RecommendBatchRequestMessage = message_class("RecommendBatchRequest")
RecommendBatchResponseMessage = message_class("RecommendBatchResponse")


def proto_text() -> str:
    """The API as a .proto file (what ``recommender.proto`` holds)."""
    fd = file_descriptor()
    names = {v: k for k, v in _SCALARS.items()}
    out = [
        "// recupdate's recommender API over gRPC, served by Ray Serve's gRPC proxy (docs/serving.md).",
        "// Generated by recupdate_workloads.serving.grpc_api.proto_text(); edit that module, not this file.",
        'syntax = "proto3";',
        "",
        f"package {PACKAGE};",
        "",
        f"service {SERVICE} {{",
    ]
    out += [
        f"  rpc {m.name}({m.input_type.rsplit('.', 1)[1]}) returns ({m.output_type.rsplit('.', 1)[1]});"
        for m in fd.service[0].method
    ]
    out.append("}")
    for m in fd.message_type:
        out.append("")
        if m.name in _COMMENTS:
            out.append(f"// {_COMMENTS[m.name]}")
        out.append(f"message {m.name} {{")
        in_oneof: int | None = None
        for f in m.field:
            oneof = f.oneof_index if f.HasField("oneof_index") else None
            if oneof != in_oneof:
                if in_oneof is not None:
                    out.append("  }")
                if oneof is not None:
                    out.append(f"  oneof {m.oneof_decl[oneof].name} {{")
                in_oneof = oneof
            indent = "    " if oneof is not None else "  "
            comment = _COMMENTS.get(f"{m.name}.{f.name}")
            if comment:
                out.append(f"{indent}// {comment}")
            ftype = f.type_name.rsplit(".", 1)[1] if f.type == _F.TYPE_MESSAGE else names[f.type]
            label = "repeated " if f.label == _F.LABEL_REPEATED else ""
            out.append(f"{indent}{label}{ftype} {f.name} = {f.number};")
        if in_oneof is not None:
            out.append("  }")
        out.append("}")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Server side: the proxy's registration, and the replica's handling


def add_RecommenderServicer_to_server(servicer: Any, server: Any) -> None:  # gRPC's naming
    """Register ``recupdate.v1.Recommender`` on a gRPC server, as generated ``*_pb2_grpc`` modules do. Serve's
    proxy replaces the handlers with its own routing; requests stay bytes (no deserializer) until the replica."""
    import grpc

    handlers = {
        method: grpc.unary_unary_rpc_method_handler(getattr(servicer, method, None)) for method, _, _ in METHODS
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(FULL_SERVICE, handlers),))


class GrpcError(Exception):
    """A request refused with a gRPC status (its name, e.g. ``INVALID_ARGUMENT``) and a message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _request_dict(msg: Any) -> dict[str, Any]:
    """A RecommendRequest message as a /recommend body. Proto3 scalars have no "unset": an empty user_id and
    n = 0 are left out, so the HTTP schema's defaults apply."""
    refs: list[Any] = []
    for r in msg.recent_clusters:
        which = r.WhichOneof("ref")
        refs.append(r.id if which == "id" else r.name if which == "name" else None)
    body: dict[str, Any] = {"recent_clusters": refs}
    if msg.user_id:
        body["user_id"] = msg.user_id
    if msg.n:
        body["n"] = msg.n
    return body


def _parse(cls: type[Message], data: bytes, limit: int, what: str) -> Any:
    if len(data) > limit:
        raise GrpcError("RESOURCE_EXHAUSTED", f"the {what} message has {len(data)} bytes; at most {limit}")
    try:
        return cls.FromString(data)  # type: ignore[attr-defined]  # generated classes have it
    except DecodeError as exc:
        raise GrpcError("INVALID_ARGUMENT", f"not a {cls.DESCRIPTOR.full_name} message: {exc}") from None


def _response(doc: Mapping[str, Any]) -> Any:
    return RecommendResponseMessage(
        clusters=[RecommendedClusterMessage(**c) for c in doc["clusters"]],  # type: ignore[call-arg]
        release=doc["release"],  # type: ignore[call-arg]
    )


def _invalid(errors: Sequence[Mapping[str, Any]]) -> GrpcError:
    code = "RESOURCE_EXHAUSTED" if any(e.get("type") == BATCH_TOO_LARGE for e in errors) else "INVALID_ARGUMENT"
    return GrpcError(code, invalid_message(errors))


async def handle_recommend(service: RecommenderService, data: bytes, *, batch: bool, limit: int) -> Any:
    """One gRPC request's answer (a response message), or GrpcError. ``limit``: the message size limit in
    bytes (the HTTP body limit of the same endpoint). Validation errors are worded as the HTTP API words them."""
    from fastapi import HTTPException

    try:
        if batch:
            msg = _parse(RecommendBatchRequestMessage, data, limit, "batch")
            doc = {"requests": [_request_dict(r) for r in msg.requests]}
            reqs = RecommendBatchRequest.model_validate(doc).requests
            out = json.loads(await service.recommend_batch(reqs))
            return RecommendBatchResponseMessage(
                results=[_response(r) for r in out["results"]],  # type: ignore[call-arg]
                release=out["release"],  # type: ignore[call-arg]
            )
        msg = _parse(RecommendRequestMessage, data, limit, "request")
        req = RecommendRequest.model_validate(_request_dict(msg))
        return _response(json.loads(await service.recommend(req)))
    except ValidationError as exc:
        raise _invalid(exc.errors(include_url=False)) from None
    except UnknownClusters as exc:
        raise _invalid(exc.errors) from None
    except HTTPException as exc:  # the service's 503: no release loaded yet
        raise GrpcError("UNAVAILABLE" if exc.status_code == 503 else "INTERNAL", str(exc.detail)) from None


async def serve_grpc(service: RecommenderService, data: bytes, grpc_context: Any, *, batch: bool, limit: int) -> Any:
    """What the deployment's gRPC methods run: ``handle_recommend``, its status set on Serve's gRPC context
    (an empty response for an error) and the request recorded in the serving metrics, code = the status name."""
    import grpc

    t0 = time.perf_counter()
    code = "OK"
    try:
        return await handle_recommend(service, data, batch=batch, limit=limit)
    except GrpcError as exc:
        code = exc.code
        if grpc_context is not None:
            grpc_context.set_code(getattr(grpc.StatusCode, exc.code))
            grpc_context.set_details(exc.message)
        return RecommendBatchResponseMessage() if batch else RecommendResponseMessage()
    finally:
        service.metrics.request("batch" if batch else "recommend", code, (time.perf_counter() - t0) * 1000)


# ---------------------------------------------------------------------------------------------------------
# Client side


class RecommenderStub:
    """A client of ``recupdate.v1.Recommender`` over a ``grpc`` or ``grpc.aio`` channel, as generated stubs are:
    ``stub.Recommend(RecommendRequestMessage(...), metadata=...)``. ``application`` is the Serve application
    (Serve routes a gRPC call by its ``application`` metadata)."""

    def __init__(self, channel: Any, application: str | None = None) -> None:
        self.metadata = (("application", application),) if application else ()
        self.Recommend = channel.unary_unary(  # the RPC's name
            f"/{FULL_SERVICE}/Recommend",
            request_serializer=RecommendRequestMessage.SerializeToString,
            response_deserializer=RecommendResponseMessage.FromString,  # type: ignore[attr-defined]
        )
        self.RecommendBatch = channel.unary_unary(
            f"/{FULL_SERVICE}/RecommendBatch",
            request_serializer=RecommendBatchRequestMessage.SerializeToString,
            response_deserializer=RecommendBatchResponseMessage.FromString,  # type: ignore[attr-defined]
        )


def request_message(recent_clusters: Sequence[int | str], n: int = 10, user_id: str | None = None) -> Any:
    """A RecommendRequest message from what a /recommend body holds."""
    refs = [ClusterRef(id=c) if isinstance(c, int) else ClusterRef(name=c) for c in recent_clusters]  # type: ignore[call-arg]
    return RecommendRequestMessage(user_id=user_id or "", recent_clusters=refs, n=n)  # type: ignore[call-arg]


def response_dict(msg: Any) -> dict[str, Any]:
    """A RecommendResponse message as /recommend's JSON answer (for comparing the two APIs)."""
    return {
        "clusters": [{"id": c.id, "name": c.name, "score": c.score, "source": c.source} for c in msg.clusters],
        "release": msg.release,
    }
