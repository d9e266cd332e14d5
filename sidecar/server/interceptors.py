"""Server interceptors: the optional bearer token."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import grpc
import structlog

log = structlog.get_logger("sidecar.server")

# Health checks and reflection stay open so launchers and grpcurl can probe a locked server.
PROTECTED_PREFIX = "/npc.v1.NpcDialogue/"


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    """Every NpcDialogue call must carry `authorization: Bearer <token>`; others get UNAUTHENTICATED."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable],
                                details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(PROTECTED_PREFIX):
            return handler
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(given).encode(), self._expected):  # constant time: no timing oracle
            return handler
        log.warning("unauthenticated call refused", method=details.method,
                    reason="no authorization metadata" if not given else "wrong token")
        return _refusing(handler, "missing authorization metadata" if not given else "wrong bearer token")


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that fails with UNAUTHENTICATED."""

    async def refuse(request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler}
    make = kinds.get((handler.request_streaming, handler.response_streaming))
    if make is None:  # the service has no client-streaming RPCs
        raise NotImplementedError("client-streaming RPCs are not protected")
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
