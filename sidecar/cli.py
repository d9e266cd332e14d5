"""`npc`: the command line. Thin: parse flags, call the layer that does the work, print."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from sidecar.config import (
    BACKENDS,
    FACT_CONTRAST,
    PROMPT_WEIGHT_FORMATS,
    WEIGHT_FORMATS,
    ModelConfig,
    resolve_model_path,
)
from sidecar.errors import ModelFileError, UserError


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line on stderr and exit code 2, like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _add_model_flags(p: argparse.ArgumentParser, device: bool = True) -> None:
    p.add_argument("--model", help="GGUF file or Hugging Face folder (default: $NPC_MODEL, else the embedded "
                                   "SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--weights", choices=WEIGHT_FORMATS, default="auto",
                   help="weight format in memory (default: auto = fastest lossless choice for the file; bf16 on a GPU)")
    if device:
        p.add_argument("--prompt-weights", choices=PROMPT_WEIGHT_FORMATS, default="auto",
                       help="prompts of int4 / int8 layers from a bf16 copy of them (faster where the CPU has bf16 "
                            "matmuls, +2 bytes per weight): auto (such CPUs, copies up to 1 GB), bf16, same (never)")
        p.add_argument("--device", default="cpu",
                       help="cpu (default), cuda, cuda:N, or auto (cuda when torch sees a GPU). The CUDA path has "
                            "not been run on a GPU yet (README)")


def _cmd_generate(args: argparse.Namespace) -> int:
    from sidecar.config import EngineConfig
    from sidecar.engine.api import SamplingParams
    from sidecar.engine.offline import OfflineEngine, Request
    from sidecar.engine.tokenizer import ChatMessage

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    model = ModelConfig(resolve_model_path(args.model), args.weights, args.device, args.prompt_weights)
    # One reply: a batch of one, its KV row as long as the prompt and the reply need.
    with OfflineEngine(model, EngineConfig(max_batch=1, max_seq_len=1 << 20), progress=not args.json) as engine:
        adapter = engine.load_adapter("adapter", Path(args.adapter)) if args.adapter else None
        tok = engine.tokenizer
        if args.raw:
            prompt_ids = tok.encode_raw_prompt(args.prompt)
        else:
            system = [ChatMessage("system", args.system)] if args.system else []
            messages = system + [ChatMessage("user", args.prompt)]
            prompt_ids = tok.encode_chat(messages)
        context = engine.engine.config.max_seq_len
        if len(prompt_ids) + params.max_tokens > context:
            raise UserError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) "
                            f"exceeds the model's context of {context} tokens")
        for event in engine.stream(Request(prompt_ids, adapter, params)):
            if event.kind == "delta" and not args.json:
                print(event.text, end="", flush=True)
            elif event.kind == "error":
                raise UserError(event.error or "generation failed")
            elif event.kind == "finished":
                finished = event
        weights = engine.engine.model.weights
    if args.json:
        print(json.dumps({
            "text": finished.text,
            "token_ids": list(finished.token_ids),
            "prompt_token_ids": prompt_ids,
            "finish_reason": finished.finish_reason,
            "weights": weights,
        }, ensure_ascii=False))
    else:
        decode_s = (finished.total_ms - finished.first_token_ms) / 1000
        rate = (len(finished.token_ids) - 1) / decode_s if decode_s > 0 and len(finished.token_ids) > 1 else 0.0
        print(f"\n[{finished.finish_reason}; {len(prompt_ids)} prompt + {len(finished.token_ids)} tokens; "
              f"{rate:.1f} tokens/s; weights {weights}]", file=sys.stderr)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from sidecar.config import EngineConfig, RemoteConfig, RequestLimits, ServerConfig
    from sidecar.server.app import serve
    from sidecar.server.logs import configure_logging

    configure_logging(args.log_level, json_lines={"json": True, "text": False}.get(args.log_format))
    server = ServerConfig(listen=args.listen, characters=Path(args.characters),
                          auth_token=args.auth_token or os.environ.get("NPC_AUTH_TOKEN") or None,
                          shutdown_grace_s=args.grace,
                          session_store=Path(args.session_store) if args.session_store else None,
                          max_session_turns=args.session_turns, limits=RequestLimits.parse(args.limit),
                          openai_listen=args.openai_listen, fact_boost=args.fact_boost,
                          fact_contrast=_fact_contrast(args))
    engine = EngineConfig(max_batch=args.max_batch, max_waiting=args.max_waiting, cuda_graphs=args.cuda_graphs)
    model = ModelConfig(resolve_model_path(args.model), args.weights, args.device, args.prompt_weights)
    remote = None
    if args.backend == "remote":
        if not args.remote_url:
            raise UserError("--backend remote: needs --remote-url (the OpenAI-compatible server, e.g. http://HOST:8000)")
        timeout = {} if args.remote_timeout is None else {"read_timeout_s": args.remote_timeout}  # else the default
        remote = RemoteConfig(args.remote_url, model=args.remote_model,
                              api_key=args.remote_api_key or os.environ.get("NPC_REMOTE_API_KEY") or None,
                              adapter_names=RemoteConfig.parse_adapter_names(args.remote_adapter), **timeout)
    elif args.remote_url or args.remote_model or args.remote_adapter or args.remote_timeout is not None:
        raise UserError("--remote-url, --remote-model, --remote-adapter and --remote-timeout need --backend remote")
    asyncio.run(serve(server, model, engine, backend=args.backend, remote=remote))
    return 0


def _fact_contrast(args: argparse.Namespace) -> float:
    """--fact-contrast as given (refused where it cannot work), else the default where it can: the torch
    backend with room for a reply's second row."""
    able = args.backend == "torch" and args.max_batch >= 2
    if args.fact_contrast is None:
        return FACT_CONTRAST if able else 0.0
    if args.fact_contrast and not able:
        raise UserError(f"--fact-contrast: needs --backend torch and --max-batch 2 or more (a reply and its shadow "
                        f"row), got --backend {args.backend} --max-batch {args.max_batch}; or --fact-contrast 0")
    return args.fact_contrast


def _add_grounding_flags(p: argparse.ArgumentParser) -> None:
    """How replies lean on a turn's facts: `npc serve` decodes so, and `npc eval` scores replies decoded so."""
    p.add_argument("--fact-contrast", type=float, metavar="W",
                   help=f"decode each reply against its prompt without the facts, with weight W (0-4; default "
                        f"{FACT_CONTRAST} on the torch backend with --max-batch 2 or more, else 0; 0 off): facts "
                        "stated more often and mixed up less, for a second K/V row per reply (docs/design-notes.md, "
                        "\"Grounding\")")
    p.add_argument("--fact-boost", type=float, default=0.0, metavar="B",
                   help="raise the tokens only a turn's facts bring by B logits (0-10; default 0, off): more facts "
                        "stated, and more facts mixed up (docs/design-notes.md, \"Grounding\")")


def _cmd_chat(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from sidecar.chat import run_chat

    return asyncio.run(run_chat(args.address, args.character, args.auth_token or os.environ.get("NPC_AUTH_TOKEN")))


def _cmd_check(args: argparse.Namespace) -> int:
    from sidecar.dialogue.check import check_characters

    load_adapter = None
    if args.adapters:  # against the base model's shapes, as `npc serve` validates them
        from sidecar.engine.adapters import read_adapter
        from sidecar.model.checkpoint import load_checkpoint

        shape = load_checkpoint(resolve_model_path(args.model)).config
        load_adapter = lambda c: read_adapter(shape, 64, c.id, c.adapter_path, c.version, c.lora_scale)  # noqa: E731
    problems, count = check_characters(Path(args.dir), load_adapter)
    for problem in problems:
        print(problem)
    print(f"{count} character(s) checked, {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


def _cmd_check_model(args: argparse.Namespace) -> int:
    from sidecar.check_model import check_model

    report = check_model(resolve_model_path(args.file), args.weights, args.device)
    if args.json:
        print(json.dumps({**asdict(report), "path": str(report.path)}))
    else:
        print("\n".join(report.lines()))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from sidecar.training.train import TrainConfig, train_character

    config = TrainConfig(rank=args.rank, alpha=args.alpha, targets=tuple(t for t in args.targets.split(",") if t),
                         epochs=args.epochs, learning_rate=args.lr, batch_size=args.batch_size, seed=args.seed,
                         held_out=args.held_out, max_steps=args.max_steps, adapter_dir=args.out,
                         label_weight=args.label_weight, fact_weight=args.fact_weight,
                         continue_from=args.continue_from)
    r = train_character(Path(args.character_dir), resolve_model_path(args.model), config, progress=not args.quiet)
    held = f", held-out loss {r.held_out_loss:.3f}" if r.held_out_loss is not None else ""
    print(f"adapter written to {r.adapter} ({r.train_lines} conversations trained, {r.held_out_lines} held out; "
          f"final train loss {r.final_train_loss:.3f}{held}; {r.seconds:.0f} s); report: {r.report.parent}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from sidecar.config import ServerConfig
    from sidecar.dialogue.retrieval import Grounding
    from sidecar.training.evaluate import evaluate_character

    contrast = FACT_CONTRAST if args.fact_contrast is None else args.fact_contrast
    served = ServerConfig(fact_boost=args.fact_boost, fact_contrast=contrast)  # checks the ranges
    r = evaluate_character(Path(args.character_dir), resolve_model_path(args.model), args.weights, args.samples,
                           grounding=Grounding(fact_boost=served.fact_boost, fact_contrast=served.fact_contrast))
    if args.json:
        print(json.dumps(r.to_json(), ensure_ascii=False))
        return 0
    print(f"{r.character}: {r.held_out_lines} held-out conversations, {r.reply_tokens} reply tokens")
    print(f"  perplexity with adapter + persona: {r.perplexity_adapter:8.2f}")
    print(f"  perplexity, persona prompt alone:  {r.perplexity_base:8.2f}")
    print(f"  ratio (adapter / base):            {r.ratio:8.3f}  (target <= 0.7)")
    if r.facts is not None and r.facts_base is not None:
        print(f"  fact accuracy, sampled (greedy):   {r.facts.sampled:8.2f} ({r.facts.greedy:.2f}); "
              f"base model {r.facts_base.sampled:.2f} ({r.facts_base.greedy:.2f})")
        print(f"  another fact stated instead:       {r.facts.mixed_sampled:8.2f} ({r.facts.mixed_greedy:.2f})")
    for s in r.samples:
        print(f"\n  player:    {s.player}\n  written:   {s.reference}\n  adapter:   {s.adapter}\n  base:      {s.base}")
    return 0


def _cmd_stubs(args: argparse.Namespace) -> int:
    from sidecar.stubs import generate_stubs

    for path in generate_stubs(args.lang, Path(args.out)):
        print(path)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from sidecar.figures import require_matplotlib

    require_matplotlib()  # every scenario ends in a PNG: say so now, not after minutes of measuring
    if args.scenario == "multi-npc":
        return _bench_multi_npc(args)
    if args.scenario == "constrained":
        return _bench_constrained(args)
    if args.scenario in ("load", "faults"):
        return _bench_reliability(args)
    if args.scenario == "retrieval":
        return _bench_retrieval(args)
    if args.scenario == "scenes":
        return _bench_scenes(args)
    if args.scenario == "warm-ttft":
        return _bench_warm_ttft(args)
    from sidecar.bench.decode import DecodeBenchConfig, run_decode_bench

    formats = tuple(args.formats.split(","))
    for f in formats:
        if f not in WEIGHT_FORMATS:
            raise UserError(f"--formats: unknown format {f!r}; choose from {','.join(WEIGHT_FORMATS)}")
    model = resolve_model_path(args.model)
    if args.model_shape:  # a random-weight Q4_K_M GGUF of that shape, written once under --workdir
        from sidecar.bench.random_gguf import ensure_random_gguf
        from sidecar.bench.random_model import SHAPES

        if args.model:
            raise UserError("--model and --model-shape exclude each other: a shape means a random-weight model")
        if args.model_shape not in SHAPES:
            raise UserError(f"--model-shape: unknown shape {args.model_shape!r}; choose from {', '.join(SHAPES)}")
        model = ensure_random_gguf(Path(args.workdir), args.model_shape)
    named = {"name": f"decode-{args.model_shape}-q4_k_m", "title": f"random {args.model_shape} Q4_K_M"} \
        if args.model_shape else {}
    cfg = DecodeBenchConfig(
        **named, model=model, formats=formats,
        batches=_int_list("--batches", args.batches or "1,8,32"), steps=args.steps, repeats=args.repeats,
        prompt_tokens=args.prompt_tokens, peers=args.peers != "none", out_dir=Path(args.out),
    )
    run_decode_bench(cfg)
    return 0


def _bench_multi_npc(args: argparse.Namespace) -> int:
    from sidecar.bench.multi_npc import PEERS, MultiNpcConfig, run_multi_npc_bench, unverified

    peers = PEERS if args.peers is None else tuple(p for p in args.peers.split(",") if p and p != "none")
    for p in peers:
        if p not in PEERS:
            raise UserError(f"--peers: unknown peer {p!r}; choose from {','.join(PEERS)} or none")
    if args.model and args.model_shape:
        raise UserError("--model and --model-shape exclude each other: a shape means a random-weight model")
    if args.model_shape:
        from sidecar.bench.random_model import SHAPES

        if args.model_shape not in SHAPES:
            raise UserError(f"--model-shape: unknown shape {args.model_shape!r}; choose from {', '.join(SHAPES)}")
    # The same checks as npc serve's (device name, int8 on CUDA, a GPU torch can use), before any work.
    device = ModelConfig(Path(args.model or "."), args.weights or "auto", args.device).resolved_device()
    for flag, value in (("--run-timeout", args.run_timeout), ("--time-budget", args.time_budget)):
        if value is not None and value <= 0:
            raise UserError(f"{flag}: must be a positive number of seconds")
    cfg = MultiNpcConfig(model=None if args.model_shape else resolve_model_path(args.model),
                         ns=_int_list("--n", args.n or "1,4,8,16,32"), tokens=args.tokens, peers=peers,
                         out_dir=Path(args.out), json_path=Path(args.json) if args.json else None,
                         workdir=Path(args.workdir), device=device, weights=args.weights,
                         model_shape=args.model_shape, run_timeout=args.run_timeout, time_budget=args.time_budget)
    data = run_multi_npc_bench(cfg)
    # A peer whose tokens did not confirm the sidecar's replies has no speed ratio: say so, and fail.
    for e in unverified(data):
        sys.stderr.write(f"npc bench: UNVERIFIED against {e['peer']} at N={e['n']}: {e['why']}; no speed ratio "
                         "reported\n")
    return 1 if unverified(data) else 0


def _bench_constrained(args: argparse.Namespace) -> int:
    """N NPC turns free and under the turn grammar, alternating on one engine (issue 15)."""
    from sidecar.bench.constrained import ConstrainedConfig, run_constrained_bench

    ns = _int_list("--n", args.n or "8")
    if len(ns) != 1:
        raise UserError("--n: the constrained scenario takes one NPC count")
    if args.rounds < 1:
        raise UserError("--rounds: must be at least 1")
    device = ModelConfig(Path(args.model or "."), args.weights or "auto", args.device).resolved_device()
    cfg = ConstrainedConfig(model=resolve_model_path(args.model), n=ns[0], text_tokens=args.tokens,
                            rounds=args.rounds, out_dir=Path(args.out),
                            json_path=Path(args.json) if args.json else None, workdir=Path(args.workdir),
                            device=device, weights=args.weights or "auto", run_timeout=args.run_timeout,
                            warm=args.warm_prefix)
    run_constrained_bench(cfg, command="npc bench " + " ".join(sys.argv[2:]))
    return 0


def _bench_retrieval(args: argparse.Namespace) -> int:
    """Fact retrieval over a big random lore folder, and its recall on the sample characters (issue 16)."""
    from sidecar.bench.retrieval import RetrievalConfig, run_retrieval_bench

    characters = Path(args.characters)
    if not characters.is_dir():
        raise UserError(f"--characters: folder {characters} not found")
    if args.entries < 1:
        raise UserError("--entries: must be at least 1")
    run_retrieval_bench(RetrievalConfig(characters, entries=args.entries, out_dir=Path(args.out)),
                        command="npc bench " + " ".join(sys.argv[2:]))
    return 0


def _bench_scenes(args: argparse.Namespace) -> int:
    """K scenes of three NPCs at once against the same scenes one after another (issue 17)."""
    from sidecar.bench.scenes import ScenesConfig, run_scenes_bench

    characters = Path(args.characters)
    if not characters.is_dir():
        raise UserError(f"--characters: folder {characters} not found")
    if args.lines < 1 or args.tokens < 1:
        raise UserError("--lines and --tokens: must be at least 1")
    cfg = ScenesConfig(characters, ks=_int_list("--n", args.n or "1,4,8"), lines=args.lines, tokens=args.tokens,
                       out_dir=Path(args.out))
    run_scenes_bench(cfg, command="npc bench " + " ".join(sys.argv[2:]))
    return 0


def _bench_warm_ttft(args: argparse.Namespace) -> int:
    """A session's first line (cold) against its next ones (warm), facts block included (issue 16)."""
    from sidecar.bench.warm_ttft import WarmTtftConfig, run_warm_ttft_bench

    characters = Path(args.characters)
    if not characters.is_dir():
        raise UserError(f"--characters: folder {characters} not found")
    if args.turns < 2 or args.tokens < 1:
        raise UserError("--turns: must be at least 2 (one cold, one warm); --tokens: at least 1")
    run_warm_ttft_bench(WarmTtftConfig(characters, turns=args.turns, tokens=args.tokens, out_dir=Path(args.out)),
                        command="npc bench " + " ".join(sys.argv[2:]))
    return 0


def _bench_reliability(args: argparse.Namespace) -> int:
    """`load` and `faults`: a real `npc serve` under many clients, then under faults."""
    characters = Path(args.characters)
    if not characters.is_dir():
        raise UserError(f"--characters: folder {characters} not found")
    for flag, value, low in (("--clients", args.clients, 1), ("--duration", args.duration, 1),
                             ("--warmup", args.warmup, 0), ("--deadline", args.deadline, 1),
                             ("--max-tokens", args.max_tokens, 0), ("--disconnects", args.disconnects, 1),
                             ("--grace", args.grace, 0)):
        if value is not None and value < low:
            raise UserError(f"{flag}: must be at least {low}")
    common = dict(characters=characters, max_tokens=args.max_tokens or 0, deadline=args.deadline,
                  out_dir=Path(args.out), report=Path(args.report))
    if args.scenario == "load":
        from sidecar.bench.load import LoadConfig, run_load_bench

        run_load_bench(LoadConfig(clients=args.clients or 64, duration=args.duration or 300.0,
                                  warmup=args.warmup, **common))
    else:
        from sidecar.bench.faults import FaultsConfig, run_faults_bench

        run_faults_bench(FaultsConfig(clients=args.clients or 16, duration=args.duration or 60.0,
                                      disconnects=args.disconnects, grace=args.grace, **common))
    return 0


def _int_list(flag: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"{flag}: every value must be at least 1")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="npc", description="npc-sidecar: every NPC its own voice.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="one-shot generation, for scripts and checks")
    _add_model_flags(g)
    g.add_argument("--adapter", help="PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    g.add_argument("--system", help="system message (chat mode)")
    g.add_argument("--raw", action="store_true", help="continue the prompt text as is, without the chat template")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("prompt")
    g.set_defaults(run=_cmd_generate)

    s = sub.add_parser("serve", help="run the sidecar: gRPC NPC dialogue for the game on this PC")
    _add_model_flags(s)
    s.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT (default 127.0.0.1:50051; port 0 = any)")
    s.add_argument("--characters", default="characters", help="characters folder (default ./characters)")
    s.add_argument("--max-batch", type=int, default=16, help="replies generated together (default 16)")
    s.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="with --device cuda: launch decode kernels one by one instead of replaying captured graphs")
    s.add_argument("--max-waiting", type=int, default=64,
                   help="replies that may queue for the batch; more get RESOURCE_EXHAUSTED (default 64)")
    s.add_argument("--auth-token", help="require `authorization: Bearer TOKEN` on every call "
                                        "(or set $NPC_AUTH_TOKEN)")
    s.add_argument("--grace", type=float, default=5.0, help="seconds replies in flight get to finish on SIGTERM")
    s.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                   help="change a request limit (repeatable): max_line_chars (2000), max_name_chars (64), "
                        "max_world_entries (32), max_world_key_chars (64), max_world_value_chars (500), "
                        "max_stop_strings (8), max_stop_chars (64), max_tokens (512)")
    _add_grounding_flags(s)
    s.add_argument("--session-store", metavar="FILE",
                   help="keep sessions in FILE: every finished turn is written as it happens and restored at start "
                        "(default: memory only)")
    s.add_argument("--session-turns", type=int, default=256,
                   help="turns a session keeps (every character's together; default 256): the prompt shows a "
                        "character's last memory.max_turns, and the older ones are its long-term memory, brought "
                        "back when the player's line refers to them")
    s.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="what runs the model: torch (in this process, default), tensorrt-llm (NVIDIA GPU; --model "
                        "is a Hugging Face folder) or remote (an OpenAI-compatible server: --remote-url)")
    s.add_argument("--remote-url", help="remote backend: the server's URL, e.g. http://10.0.0.5:8000 (vLLM with "
                                        "--enable-lora, trtllm-serve, or another `npc serve --openai-listen`)")
    s.add_argument("--remote-model", help="remote backend: the remote's name for the base model (default: the first "
                                          "model it lists); --model must be the same model (its tokenizer is used)")
    s.add_argument("--remote-api-key", help="remote backend: sent as `Authorization: Bearer KEY` "
                                            "(or set $NPC_REMOTE_API_KEY)")
    s.add_argument("--remote-adapter", action="append", default=[], metavar="ID=NAME",
                   help="remote backend: the remote's model name for a character's adapter (default: the character "
                        "id; repeatable)")
    s.add_argument("--remote-timeout", type=float, metavar="SECONDS",
                   help="remote backend: how long the remote may stay silent (no answer, or no chunk mid-reply) "
                        "before the reply fails with UNAVAILABLE (default 60)")
    s.add_argument("--openai-listen", metavar="HOST:PORT",
                   help="also serve an OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions) "
                        "on HOST:PORT, with the same --auth-token (port 0 = any)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument("--log-format", default="auto", choices=["auto", "json", "text"],
                   help="auto: readable on a terminal, JSON lines otherwise")
    s.set_defaults(run=_cmd_serve)

    c = sub.add_parser("chat", help="talk to a character (playtesting)")
    c.add_argument("character", nargs="?", help="character id (default: the first one)")
    c.add_argument("--address", default="127.0.0.1:50051", help="where `npc serve` listens")
    c.add_argument("--auth-token", help="the server's --auth-token (or set $NPC_AUTH_TOKEN)")
    c.set_defaults(run=_cmd_chat)

    k = sub.add_parser("check", help="validate every character (YAML and adapter); exit 1 listing problems")
    k.add_argument("dir", nargs="?", default="characters")
    k.add_argument("--model", help="base model the adapters must fit (default: the embedded one)")
    k.add_argument("--no-adapters", dest="adapters", action="store_false",
                   help="check only the YAML files, not the adapter weights")
    k.set_defaults(run=_cmd_check)

    m = sub.add_parser("check-model", help="what a model file is, what it becomes in memory, how fast it decodes here")
    m.add_argument("file", nargs="?", help="a GGUF file or Hugging Face folder (default: the embedded model)")
    m.add_argument("--weights", default="auto",
                   help="format in memory: auto (per stored kind) | int4 | int8 | bf16 | fp32")
    m.add_argument("--device", default="cpu", help="cpu | cuda[:N]")
    m.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    m.set_defaults(run=_cmd_check_model)

    t = sub.add_parser("train", help="train a character's persona adapter from its dialogue.jsonl (PEFT LoRA)")
    t.add_argument("character_dir")
    t.add_argument("--model", help="base model (default: the embedded one; must be what the sidecar serves)")
    t.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    t.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    t.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="modules to adapt, comma-separated (default: all seven)")
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    t.add_argument("--label-weight", type=float, default=4.0,
                   help="loss weight of the emotion label and action tokens against the text's (default 4)")
    t.add_argument("--fact-weight", type=float, default=1.0,
                   help="loss weight of reply tokens copied from the line's facts block (default 1)")
    t.add_argument("--continue", dest="continue_from", metavar="ADAPTER",
                   help="continue training this adapter folder of the character (keeps its rank, alpha, targets "
                        "and held-out lines) instead of starting a fresh one")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--seed", type=int, default=0, help="same seed, same data -> same adapter")
    t.add_argument("--held-out", type=float, default=0.1, help="fraction of conversations kept for npc eval")
    t.add_argument("--max-steps", type=int, help="stop after this many steps (quick checks)")
    t.add_argument("--out", default="adapter", help="adapter folder name inside the character folder")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(run=_cmd_train)

    e = sub.add_parser("eval", help="persona fidelity: held-out perplexity with and without the adapter")
    e.add_argument("character_dir")
    _add_model_flags(e, device=False)
    e.add_argument("--samples", type=int, default=3, help="replies shown side by side")
    _add_grounding_flags(e)
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(run=_cmd_eval)

    st = sub.add_parser("stubs", help="generate client code from the proto (cpp, csharp, python)")
    st.add_argument("--lang", required=True, choices=["cpp", "csharp", "python"])
    st.add_argument("--out", required=True, help="folder to write into")
    st.set_defaults(run=_cmd_stubs)

    b = sub.add_parser("bench", help="benchmarks (reports, not tests)")
    b.add_argument("--scenario", choices=["decode", "multi-npc", "constrained", "load", "faults",
                                                "retrieval", "scenes", "warm-ttft"], default="decode")
    b.add_argument("--model")
    b.add_argument("--peers", help="comma-separated peers to compare against: llama.cpp,hf-peft (multi-npc) "
                                   "or llama.cpp (decode); 'none' for none; default: every installed one")
    b.add_argument("--out", default="docs/bench", help="folder for the JSON, Markdown and PNG report")
    b.add_argument("--n", help="multi-npc: NPC counts (default 1,4,8,16,32); constrained: one NPC count (default 8); "
                               "scenes: scene counts (default 1,4,8)")
    b.add_argument("--tokens", type=int, default=64,
                   help="multi-npc: new tokens per NPC; constrained: each turn's text budget; scenes: each line's")
    b.add_argument("--lines", type=int, default=6, help="scenes: lines per scene (default 6)")
    b.add_argument("--turns", type=int, default=6, help="warm-ttft: questions per character (default 6)")
    b.add_argument("--rounds", type=int, default=5,
                   help="constrained: timed rounds of one free and one constrained run (the median is reported)")
    b.add_argument("--warm-prefix", action="store_true",
                   help="constrained: keep every persona in the prefix cache instead of emptying it before each run")
    b.add_argument("--json", help="multi-npc: also write the results to this JSON file")
    b.add_argument("--device", default="cpu",
                   help="multi-npc: cpu (default), cuda or cuda:N; on a GPU the report is gpu.{json,md,png}")
    b.add_argument("--model-shape",
                   help="multi-npc: benchmark a random-weight model of this shape (llama-3.2-1b, tiny), written "
                        "once under --workdir; decode: a random Q4_K_M GGUF of it; excludes --model")
    b.add_argument("--weights", choices=WEIGHT_FORMATS,
                   help="multi-npc: our weight format (default: auto on the CPU, bf16 on a GPU)")
    b.add_argument("--workdir", default="/tmp/npc-bench-multi",
                   help="multi-npc: where the random adapters (and models) are kept between runs")
    b.add_argument("--run-timeout", type=float,
                   help="multi-npc: seconds one (system, N) run may take before it is killed (default: no limit)")
    b.add_argument("--time-budget", type=float,
                   help="multi-npc: seconds for all runs together; later runs are skipped (default: no limit)")
    b.add_argument("--formats", default="auto,int4,int8,bf16,fp32",
                   help="decode: weight formats (auto: each stored kind as the server would load it)")
    b.add_argument("--batches", help="decode: batch sizes (default 1,8,32)")
    b.add_argument("--steps", type=int, default=32, help="decode: steps timed per repeat")
    b.add_argument("--repeats", type=int, default=3, help="decode: repeats (the median is reported)")
    b.add_argument("--prompt-tokens", type=int, default=64, help="decode: prompt length")
    b.add_argument("--entries", type=int, default=10_000, help="retrieval: random lore entries")
    b.add_argument("--characters", default="characters",
                   help="load, faults, retrieval, scenes, warm-ttft: characters to serve (load, faults: copied to "
                        "a temp folder first; default ./characters)")
    b.add_argument("--clients", type=int, help="load, faults: clients talking at once (default 64 / 16)")
    b.add_argument("--duration", type=float,
                   help="load: seconds measured after the warm-up (default 300); faults: seconds of the edit, "
                        "adapter and SIGTERM steps together (default 60)")
    b.add_argument("--warmup", type=float, default=30.0, help="load: seconds of load before measuring (default 30)")
    b.add_argument("--deadline", type=float, default=120.0, help="load, faults: deadline of each reply in seconds")
    b.add_argument("--max-tokens", type=int, help="load, faults: max_tokens of each reply (default: the character's)")
    b.add_argument("--disconnects", type=int, default=1000,
                   help="faults: clients that hang up mid-reply, 50 at a time (default 1000)")
    b.add_argument("--grace", type=float, default=1.0,
                   help="faults: the server's --grace for the SIGTERM step (default 1 s: short enough that some "
                        "replies in flight are cancelled and some finish)")
    b.add_argument("--report", default="docs/reliability.md",
                   help="load, faults: Markdown document whose section for the scenario is rewritten")
    b.set_defaults(run=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":  # (serve sets its own) stdout is the command's output: `npc eval --json`
        from sidecar.server.logs import configure_logging

        configure_logging("warning", json_lines=False)
    try:
        return args.run(args)
    except ModelFileError as e:  # the file is the problem, not how the command was typed (as `npc check`)
        sys.stderr.write(f"npc {args.command}: error: {e}\n")
        return 1
    except UserError as e:
        sys.stderr.write(f"npc {args.command}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # `python -m sidecar.cli`, where the `npc` script is not installed (a bare GPU box)
    sys.exit(main())
