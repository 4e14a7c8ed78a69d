"""The client subcommands of `infomamba`: generate, stream, bench. Each takes --url and --api-key (env
INFOMAMBA_URL, INFOMAMBA_API_KEY) and talks to a running server through clients.client."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

from clients.client import DEFAULT_URL, AsyncInfoMambaClient, InfoMambaClient, InfoMambaError, StreamSession

OUTPUT_KINDS = ("logits", "logprobs", "hidden", "head")


def add_client_commands(sub) -> None:
    """Register generate, stream and bench on the `infomamba` subparsers."""
    _add_generate(sub)
    _add_stream(sub)
    _add_bench(sub)


def _connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("INFOMAMBA_URL", DEFAULT_URL),
                        help=f"server URL (env INFOMAMBA_URL; default {DEFAULT_URL})")
    parser.add_argument("--api-key", default=os.environ.get("INFOMAMBA_API_KEY") or None,
                        help="bearer token (env INFOMAMBA_API_KEY)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")


def _sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    parser.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate (default {max_tokens})")
    parser.add_argument("--temperature", type=float, default=None, help="0 is greedy (server default 1.0)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")


def _sampling(args: argparse.Namespace) -> dict:
    fields = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
              "top_k": args.top_k, "seed": args.seed, "stop": args.stop}
    return {k: v for k, v in fields.items() if v is not None}


def _fail(command: str, exc: Exception) -> int:
    print(f"infomamba {command}: {exc}", file=sys.stderr)
    return 1


# --- generate ---------------------------------------------------------------------------------------------------

def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="complete a prompt on a running server, streaming the text")
    p.add_argument("prompt", help="the prompt text ('-' reads standard input)")
    p.add_argument("--model", default=None, help="model name (default: the one the server serves)")
    p.add_argument("--no-stream", action="store_true", help="print the whole completion at the end")
    _sampling_args(p, max_tokens=64)
    _connection_args(p)
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        with InfoMambaClient(args.url, args.api_key, timeout=args.timeout) as client:
            if args.no_stream:
                sys.stdout.write(client.completions(prompt, args.model, **_sampling(args))["choices"][0]["text"])
            else:
                for text in client.stream_text(prompt, args.model, **_sampling(args)):
                    sys.stdout.write(text)
                    sys.stdout.flush()
    except InfoMambaError as exc:
        sys.stdout.write("\n")
        return _fail("generate", exc)
    sys.stdout.write("\n")
    return 0


# --- stream -----------------------------------------------------------------------------------------------------

def _add_stream(sub) -> None:
    p = sub.add_parser(
        "stream", help="feed a long file chunk by chunk through a websocket session, saving per-step outputs",
        description="Feed FILE through one session over WS /v1/stream. A .npy file holds token ids (an integer "
                    "vector) or float vectors (steps, d_input) and goes in binary frames; any other file is read as "
                    "UTF-8 text (the server tokenizes it). --snapshot saves the state (and where in FILE it "
                    "stopped) so a later run with --resume carries on from there.")
    p.add_argument("file", help="input: .npy (ids or float vectors) or a text file")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="steps per append (.npy; default 1024) or characters per append (text; default 4096)")
    p.add_argument("--out", default=None,
                   help="save per-step outputs: .npy (one output kind) or .safetensors (one tensor per kind)")
    p.add_argument("--outputs", default=None,
                   help=f"comma-separated output kinds among {','.join(OUTPUT_KINDS)} (default with --out: head)")
    p.add_argument("--snapshot", default=None, help="save the session's state snapshot here (+ PATH.json progress)")
    p.add_argument("--snapshot-every", type=int, default=0, help="also save the snapshot every N chunks")
    p.add_argument("--resume", default=None, help="resume from a snapshot saved by --snapshot, skipping what it saw")
    p.add_argument("--session", default=None, help="attach to an existing session id instead of a new one")
    p.add_argument("--keep", action="store_true", help="keep the server-side session when done (default: delete)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _connection_args(p)
    p.set_defaults(func=_stream)


def _read_source(path: Path, chunk_size: int | None):
    """(units, total, unit name, chunk size, is_array): units is an ndarray or a str."""
    if path.suffix == ".npy":
        import numpy as np

        array = np.load(path, allow_pickle=False)
        if np.issubdtype(array.dtype, np.integer):
            array = array.reshape(-1)
        elif not (np.issubdtype(array.dtype, np.floating) and array.ndim == 2):
            raise ValueError(f"{path}: expected an integer vector or a (steps, d_input) float array, "
                             f"got {array.dtype} {array.shape}")
        return array, len(array), "step", chunk_size or 1024, True
    text = path.read_text(encoding="utf-8")
    return text, len(text), "char", chunk_size or 4096, False


def _progress_meta(path: str) -> Path:
    return Path(path + ".json")


def _save_snapshot(ws: StreamSession, path: str, source: Path, offset: int) -> None:
    data = ws.snapshot()
    Path(path).write_bytes(data)
    meta = {"source": str(source), "offset": offset, "steps": ws.steps, "session": ws.id}
    _progress_meta(path).write_text(json.dumps(meta, indent=2) + "\n")


def _stream(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    source = Path(args.file)
    if args.resume and args.session:
        return _fail("stream", ValueError("give --resume or --session, not both"))
    try:
        units, total, unit, chunk_size, is_array = _read_source(source, args.chunk_size)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return _fail("stream", exc)
    if chunk_size < 1:
        return _fail("stream", ValueError("--chunk-size must be >= 1"))
    kinds = [k for k in (args.outputs or ("head" if args.out else "")).split(",") if k]
    bad = [k for k in kinds if k not in OUTPUT_KINDS]
    if bad:
        return _fail("stream", ValueError(f"--outputs: unknown kinds {bad}; expected among {OUTPUT_KINDS}"))
    if args.out and not kinds:
        return _fail("stream", ValueError("--out needs at least one output kind"))
    if args.out and args.out.endswith(".npy") and len(kinds) != 1:
        return _fail("stream", ValueError("a .npy --out holds one output kind; use .safetensors for several"))

    offset, snapshot = 0, None
    if args.resume:
        try:
            snapshot = Path(args.resume).read_bytes()
            meta_path = _progress_meta(args.resume)
            offset = json.loads(meta_path.read_text())["offset"] if meta_path.exists() else 0
        except (OSError, ValueError, KeyError) as exc:
            return _fail("stream", exc)
        if offset > total:
            return _fail("stream", ValueError(f"--resume: the snapshot saw {offset} {unit}s, {source} has {total}"))

    collected: dict[str, list] = {k: [] for k in kinds}
    # a session this run created is deleted when it ends (even on an error) unless --keep; an attached one stays
    delete = args.session is None and not args.keep
    try:
        ws = StreamSession.connect(args.url, args.api_key, session=args.session, snapshot=snapshot,
                                   timeout=args.timeout)
        try:
            with tqdm(total=total, initial=offset, unit=unit, unit_scale=True, disable=args.quiet,
                      desc=source.name, file=sys.stderr) as bar:
                every = args.snapshot_every if args.snapshot else 0
                while offset < total:
                    # chunks go pipelined (a window in flight, answers in order) up to the next snapshot point
                    end = min(total, offset + every * chunk_size) if every else total
                    pieces = [units[i:i + chunk_size] for i in range(offset, end, chunk_size)]
                    for piece, reply in zip(pieces, ws.append_many(pieces, outputs=kinds)):
                        for kind in kinds:
                            collected[kind].append(reply["results"].get(kind, []))
                        offset += len(piece)
                        bar.update(len(piece))
                        bar.set_postfix(steps=ws.steps)
                    if every and offset < total:
                        _save_snapshot(ws, args.snapshot, source, offset)
            if args.snapshot:
                _save_snapshot(ws, args.snapshot, source, offset)
            if not delete:
                print(f"session {ws.id} kept ({ws.steps} steps)", file=sys.stderr)
        finally:
            ws.close(delete=delete)
        steps = ws.steps
    except InfoMambaError as exc:
        return _fail("stream", exc)
    if args.out:
        _write_outputs(args.out, collected)
    print(f"{source}: {total} {unit}s fed, session at {steps} steps"
          + (f", outputs in {args.out}" if args.out else "")
          + (f", snapshot in {args.snapshot}" if args.snapshot else ""), file=sys.stderr)
    return 0


def _write_outputs(path: str, collected: dict[str, list]) -> None:
    import numpy as np

    arrays = {}
    for kind, pieces in collected.items():
        parts = [np.asarray(p, dtype=np.float32) for p in pieces if len(p)]
        if not parts:
            arrays[kind] = np.zeros((0,), dtype=np.float32)
        elif all(p.ndim >= 2 for p in parts):
            arrays[kind] = np.concatenate(parts, axis=0)  # per-step rows: (steps, width)
        else:
            arrays[kind] = np.stack(parts)  # one vector per chunk (classify heads)
    if path.endswith(".npy"):
        np.save(path, next(iter(arrays.values())))
    else:
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, path)


# --- bench ------------------------------------------------------------------------------------------------------

def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench", help="concurrent load against a running server: throughput and latency percentiles",
        description="Sends --requests requests, at most --concurrency at a time. Token models get streaming "
                    "completions (time to first token, time per output token, end-to-end); float-input models get "
                    "/v1/forward (end-to-end). Prompts are random token ids or vectors of --prompt-len steps.")
    p.add_argument("--requests", type=int, default=64, help="requests in all (default 64)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default 8)")
    p.add_argument("--prompt-len", type=int, default=128, help="input steps per request (default 128)")
    p.add_argument("--prompt", default=None, help="use this text as every prompt instead of random ids")
    p.add_argument("--mode", choices=("auto", "completions", "forward"), default="auto",
                   help="auto: completions for language models, forward otherwise")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per completion (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0, greedy)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _connection_args(p)
    p.set_defaults(func=_bench)


def percentiles(values: list[float], qs=(50, 90, 99)) -> dict[str, float | None]:
    """Nearest-rank-interpolated percentiles (numpy's default 'linear'); None for an empty list."""
    if not values:
        return {f"p{q}": None for q in qs}
    import numpy as np

    return {f"p{q}": float(np.percentile(values, q)) for q in qs}


async def _bench_one(client: AsyncInfoMambaClient, mode: str, prompt, args, record: dict) -> None:
    start = time.perf_counter()
    try:
        if mode == "completions":
            first, last, n = None, None, 0
            async for chunk in client.stream_completions(prompt, max_tokens=args.max_tokens,
                                                         temperature=args.temperature, ignore_eos=True,
                                                         stream_options={"include_usage": True}):
                if chunk.get("usage"):
                    record["input_steps"] += chunk["usage"].get("prompt_tokens", 0)
                if chunk.get("choices") and chunk["choices"][0].get("finish_reason") is None:
                    now = time.perf_counter()
                    first = first if first is not None else now
                    last, n = now, n + 1
            end = time.perf_counter()
            if first is not None:
                record["ttft"].append(first - start)
            if n > 1:
                record["tpot"].append((last - first) / (n - 1))
            record["generated"] += n
        else:
            key = "inputs" if isinstance(prompt[0][0], list) else "input_ids"
            reply = await client.forward(**{key: prompt}, outputs=[])
            end = time.perf_counter()
            record["input_steps"] += reply.get("usage", {}).get("prompt_tokens", 0)
        record["e2e"].append(end - start)
        record["ok"] += 1
    except InfoMambaError as exc:
        record["errors"][exc.code] = record["errors"].get(exc.code, 0) + 1


def _new_record() -> dict:
    return {"mode": None, "start": None, "ok": 0, "errors": {}, "ttft": [], "tpot": [], "e2e": [], "generated": 0,
            "input_steps": 0}


async def _bench_run(args: argparse.Namespace, record: dict) -> None:
    """Fill `record` as requests finish, so an interrupted run still has what completed."""
    import numpy as np
    from tqdm import tqdm

    rng = np.random.default_rng(args.seed)
    async with AsyncInfoMambaClient(args.url, args.api_key, timeout=args.timeout,
                                    max_connections=args.concurrency) as client:
        model = (await client.models())[0]
        config = model.get("config", {})
        is_lm = config.get("head", "lm") == "lm" and config.get("vocab_size")
        mode = args.mode if args.mode != "auto" else ("completions" if is_lm else "forward")
        if mode == "completions" and not is_lm:
            raise InfoMambaError(0, "bad_mode", "completions need a language model; use --mode forward")

        def make_prompt():
            if args.prompt is not None:
                return args.prompt if mode == "completions" else None
            if config.get("vocab_size"):
                ids = rng.integers(0, config["vocab_size"], args.prompt_len).tolist()
                return ids if mode == "completions" else [ids]
            return [rng.standard_normal((args.prompt_len, config["d_input"])).astype(np.float32).tolist()]

        if args.prompt is not None and mode == "forward":
            raise InfoMambaError(0, "bad_mode", "--prompt works with completions only")
        if not args.quiet:
            size = "text prompt" if args.prompt is not None else f"{args.prompt_len} input steps"
            size += f", {args.max_tokens} tokens each" if mode == "completions" else ""
            print(f"bench: {args.requests} {mode} requests ({size}) at concurrency {args.concurrency} "
                  f"against {model.get('id', '?')} at {args.url}", file=sys.stderr, flush=True)
        record["mode"] = mode
        gate = asyncio.Semaphore(args.concurrency)
        # the bar's postfix carries the running numbers, so a long run shows its results as it goes
        bar = tqdm(total=args.requests, unit="req", desc="bench", disable=args.quiet, file=sys.stderr)

        async def one(prompt):
            async with gate:
                await _bench_one(client, mode, prompt, args, record)
            elapsed = time.perf_counter() - record["start"]
            live = {"ok": record["ok"], "failed": sum(record["errors"].values())}
            if mode == "completions":
                live["tok/s"] = f"{record['generated'] / elapsed:.1f}"
            else:
                live["steps/s"] = f"{record['input_steps'] / elapsed:.1f}"
            if record["e2e"]:
                live["p50 e2e"] = f"{percentiles(record['e2e'], (50,))['p50'] * 1000:.0f}ms"
            bar.set_postfix(live, refresh=False)
            bar.update(1)

        prompts = [make_prompt() for _ in range(args.requests)]
        record["start"] = time.perf_counter()
        try:
            await asyncio.gather(*(one(p) for p in prompts))
        finally:
            bar.close()


def _summary(args: argparse.Namespace, record: dict, interrupted: bool = False) -> dict:
    wall = time.perf_counter() - record["start"]
    return {
        "mode": record["mode"], "requests": args.requests, "concurrency": args.concurrency, "ok": record["ok"],
        "failed": sum(record["errors"].values()), "errors": record["errors"], "wall_s": wall,
        "requests_per_s": record["ok"] / wall, "input_steps_per_s": record["input_steps"] / wall,
        "generated_tokens_per_s": record["generated"] / wall,
        "ttft_s": percentiles(record["ttft"]), "tpot_s": percentiles(record["tpot"]),
        "e2e_s": percentiles(record["e2e"]), "interrupted": interrupted,
    }


def _format_bench(r: dict) -> str:
    def ms(p: dict) -> str:
        return "  ".join(f"{k} {v * 1000:8.1f} ms" if v is not None else f"{k}      n/a" for k, v in p.items())

    lines = [
        f"mode {r['mode']}: {r['ok']}/{r['requests']} ok, {r['failed']} failed"
        + (f" {r['errors']}" if r["errors"] else "") + f", concurrency {r['concurrency']}, {r['wall_s']:.2f} s"
        + (" (interrupted: partial results)" if r["interrupted"] else ""),
        f"throughput       {r['requests_per_s']:.2f} req/s   {r['input_steps_per_s']:.1f} input steps/s   "
        f"{r['generated_tokens_per_s']:.1f} generated tokens/s",
    ]
    if r["mode"] == "completions":
        lines.append(f"time to first    {ms(r['ttft_s'])}")
        lines.append(f"time per token   {ms(r['tpot_s'])}")
    lines.append(f"end to end       {ms(r['e2e_s'])}")
    return "\n".join(lines)


def _bench(args: argparse.Namespace) -> int:
    if args.requests < 1 or args.concurrency < 1 or args.prompt_len < 1 or args.max_tokens < 1:
        return _fail("bench", ValueError("--requests, --concurrency, --prompt-len and --max-tokens must be >= 1"))
    record = _new_record()
    interrupted = False
    try:
        asyncio.run(_bench_run(args, record))
    except InfoMambaError as exc:
        return _fail("bench", exc)
    except KeyboardInterrupt:
        if record["start"] is None:
            return 130
        interrupted = True  # Ctrl-C: report what finished so far
    result = _summary(args, record, interrupted)
    print(json.dumps(result, indent=2) if args.json else _format_bench(result), flush=True)
    if interrupted:
        return 130
    return 0 if result["ok"] else 1
