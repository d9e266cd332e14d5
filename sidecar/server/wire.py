"""The NpcDialogue method handlers, with requests parsed leniently.

grpc's generated registration parses each request with `FromString`; bytes that do not parse (bad
UTF-8 in a string field, a corrupt wire format) then fail inside grpc with UNKNOWN. Here they
become a `Malformed` value that the handler answers with INVALID_ARGUMENT, as the contract says
for bad input.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
from google.protobuf.message import DecodeError

from sidecar.pb.npc.v1 import dialogue_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["NpcDialogue"]


class Malformed:
    """A request whose bytes did not parse."""

    def __init__(self, message: str):
        self.message = message


def _lenient(message_type) -> Callable[[bytes], object]:
    def parse(data: bytes) -> object:
        try:
            return message_type.FromString(data)
        except DecodeError as e:
            return Malformed(f"request: not a valid {message_type.DESCRIPTOR.full_name}: {e}")

    return parse


def _unary(method):
    async def handle(request, context: grpc.aio.ServicerContext):
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await method(request, context)

    return handle


def _streaming(method):
    async def handle(request, context: grpc.aio.ServicerContext):
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        async for response in method(request, context):
            yield response

    return handle


def dialogue_handler(servicer) -> grpc.GenericRpcHandler:
    """Every RPC of npc.v1.NpcDialogue, bound to `servicer`'s methods of the same names."""
    handlers = {}
    for m in SERVICE.methods:
        request, response = getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)
        behaviour = getattr(servicer, m.name)
        if m.server_streaming:
            handlers[m.name] = grpc.unary_stream_rpc_method_handler(
                _streaming(behaviour), request_deserializer=_lenient(request),
                response_serializer=response.SerializeToString)
        else:
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(
                _unary(behaviour), request_deserializer=_lenient(request),
                response_serializer=response.SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)
