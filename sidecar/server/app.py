"""`npc serve`: the engine, the characters and the sessions behind one grpc.aio server.

Also runs the standard health service (grpc.health.v1) and server reflection, so launchers can
probe readiness and grpcurl can call it without the proto. SIGTERM / SIGINT drain: new calls get
UNAVAILABLE, replies in flight have `shutdown_grace_s` to finish, then end with CANCELLED.
"""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import time

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from sidecar.backends import create_engine
from sidecar.config import EngineConfig, ModelConfig, RemoteConfig, ServerConfig, parse_listen
from sidecar.dialogue.lore import LORE_FOLDER, LoreLibrary
from sidecar.dialogue.registry import CharacterRegistry
from sidecar.dialogue.retrieval import FactRetriever, Grounding
from sidecar.dialogue.session_file import SessionFile
from sidecar.dialogue.sessions import SessionStore
from sidecar.dialogue.turn import Dialogue
from sidecar.errors import ModelFileError, UserError
from sidecar.pb.npc.v1 import dialogue_pb2
from sidecar.server.interceptors import BearerTokenAuth
from sidecar.server.openai_http import OpenAiEndpoint
from sidecar.server.service import DialogueService
from sidecar.server.wire import dialogue_handler

log = structlog.get_logger("sidecar.server")

SERVICE_NAME = dialogue_pb2.DESCRIPTOR.services_by_name["NpcDialogue"].full_name
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # a TalkRequest is a few KB; this bounds what a bad client can send


def is_loopback(listen: str, flag: str = "--listen") -> bool:
    """Whether HOST:PORT only accepts connections from this machine."""
    host = parse_listen(flag, listen)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


async def serve(server_config: ServerConfig, model_config: ModelConfig, engine_config: EngineConfig,
                stop: asyncio.Event | None = None, backend: str = "torch", remote: RemoteConfig | None = None) -> None:
    """Runs until `stop` is set or SIGTERM / SIGINT arrives. Prints `listening on HOST:PORT` on stdout when ready
    (after `openai http on HOST:PORT` when --openai-listen is set)."""
    started = time.perf_counter()
    if not server_config.characters.is_dir():  # fail fast, before the model loads
        raise UserError(f"--characters: folder {server_config.characters} not found")
    sessions = SessionStore(server_config.max_sessions, server_config.max_session_turns)
    session_file = SessionFile(server_config.session_store) if server_config.session_store else None
    if session_file is not None:  # before the model loads: a bad or locked file fails fast
        session_file.open(sessions)
    log.info("loading model", path=str(model_config.path), weights=model_config.weights, backend=backend)
    engine = await create_engine(backend, model_config, engine_config, remote)
    if not engine.model.tokenizer.chat_template:  # every NPC prompt is built with it
        await engine.shutdown()
        raise ModelFileError(engine.model.path, "no chat template (tokenizer.chat_template): every NPC prompt is "
                                                "built with the model's own template; use an instruct model's file")
    if server_config.limits.max_tokens >= engine.config.max_seq_len:
        await engine.shutdown()
        raise UserError(f"--limit max_tokens: must be below the context length ({engine.config.max_seq_len} tokens), "
                        f"got {server_config.limits.max_tokens}")

    # Each character's adapter is validated against the base model before its version serves, and kept
    # in memory with it: a broken adapter keeps the last good version serving.
    # The lore beside the characters (characters/lore) is rescanned with them, on the same thread.
    retriever = FactRetriever(LoreLibrary(server_config.characters / LORE_FOLDER),
                              Grounding(fact_boost=server_config.fact_boost,
                                        fact_contrast=server_config.fact_contrast))
    registry = CharacterRegistry(server_config.characters, adapter_loader=lambda c: engine.load_adapter(
        c.id, c.adapter_path, c.adapter_version or c.version, c.lora_scale), also_scan=retriever.reload)
    dialogue = Dialogue(engine, registry, sessions, server_config.limits, retriever)
    service = DialogueService(dialogue)
    http = OpenAiEndpoint(dialogue, server_config)

    interceptors = [BearerTokenAuth(server_config.auth_token)] if server_config.auth_token else []
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((dialogue_handler(service),))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection([SERVICE_NAME, "grpc.health.v1.Health", reflection.SERVICE_NAME], server)
    try:
        port = server.add_insecure_port(server_config.listen)
    except RuntimeError:
        port = 0
    http_address = None
    try:
        if not port:
            raise UserError(f"--listen: cannot listen on {server_config.listen} (address in use or not local?)")
        if server_config.openai_listen:
            http_address = await http.start(server_config.openai_listen)
    except UserError:
        await engine.shutdown()
        if session_file is not None:
            session_file.close(sessions)
        raise
    await server.start()
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    registry.start_watching(server_config.reload_interval_s)
    address = f"{parse_listen('--listen', server_config.listen)[0]}:{port}"
    characters = registry.list()
    log.info("serving", address=address, model=engine.model.path.name, weights=engine.model.weights,
             backend=engine.name, openai_http=http_address,
             characters=[c.id for c in characters], failed=[c.id for c in characters if c.error],
             auth=bool(server_config.auth_token), startup_s=round(time.perf_counter() - started, 1))
    for flag, listen in (("--listen", server_config.listen), ("--openai-listen", server_config.openai_listen)):
        if listen and not is_loopback(listen, flag) and not server_config.auth_token:
            log.warning("listening beyond this PC without --auth-token: anyone who can reach the port can make "
                        "NPCs talk; set --auth-token (or $NPC_AUTH_TOKEN) or listen on 127.0.0.1", address=listen)
    if missing := engine.missing_adapters([c.id for c in characters if c.has_adapter]):
        log.warning("the backend lists no model for these characters' adapters; their replies fail with "
                    "FAILED_PRECONDITION until it serves them", models=missing)
    if http_address:
        print(f"openai http on {http_address}", flush=True)
    print(f"listening on {address}", flush=True)  # the line launchers and tests wait for

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests), or Windows
            pass
    await stop.wait()

    # Drain: refuse new replies, let those in flight finish, then cancel the rest.
    log.info("shutting down", in_flight=len(dialogue.in_flight), grace_s=server_config.shutdown_grace_s)
    dialogue.accepting = False
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    deadline = time.perf_counter() + server_config.shutdown_grace_s
    while dialogue.busy and time.perf_counter() < deadline:  # gRPC and HTTP replies alike
        await asyncio.sleep(0.02)
    if cancelled := dialogue.cancel_all():
        log.info("grace period over: replies cancelled", cancelled=cancelled)
    for _ in range(200):  # their Finished(CANCELLED) events go out within a step or two
        if not dialogue.busy:
            break
        await asyncio.sleep(0.01)
    await server.stop(grace=1.0)
    await http.stop()
    if session_file is not None:  # every finished turn is already in its journal; this compacts it
        session_file.close(sessions)
    registry.stop_watching()
    await engine.shutdown()
    log.info("stopped")
