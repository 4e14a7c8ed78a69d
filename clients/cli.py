"""The `infomamba` command: serve, convert, and client commands."""
from __future__ import annotations

import argparse
import os
import sys


def _convert(args: argparse.Namespace) -> int:
    from model.convert import convert_mamba
    from model.weights import WeightsError

    try:
        dst = convert_mamba(args.src, args.dst, name=args.name, progress=not args.quiet)
    except (WeightsError, ValueError) as exc:
        print(f"infomamba convert: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {dst}")
    return 0


def _flag(value: str) -> bool:
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


_flag.__name__ = "boolean (true/false)"


def _flag_or_auto(value: str) -> bool | str:
    return "auto" if value.strip().lower() == "auto" else _flag(value)


_flag_or_auto.__name__ = "true, false or auto"

# serve flags: (flag, ServerConfig field, type, help); each also reads INFOMAMBA_<FIELD> from the environment
SERVE_FLAGS = (
    ("--host", "host", str, "address to listen on"),
    ("--port", "port", int, "port to listen on"),
    ("--device", "device", str, "auto, cpu, cuda, cuda:N"),
    ("--dtype", "dtype", str, "auto, float32, bfloat16, float16"),
    ("--max-num-streams", "max_num_streams", int,
     "state pool slots (live sessions + in-flight requests); 0: as many as fit in --gpu-memory-fraction"),
    ("--gpu-memory-fraction", "gpu_memory_fraction", float, "share of free GPU memory the sized pool may take"),
    ("--max-num-batched-tokens", "max_num_batched_tokens", int, "input steps per engine step"),
    ("--max-num-prefill-tokens", "max_num_prefill_tokens", int,
     "input steps per engine step while no stream decodes (long appends go through in few steps)"),
    ("--max-prefill-wait-steps", "max_prefill_wait_steps", int,
     "CUDA-graph decode steps a batch runs while new inputs too long for the prefill graphs wait, before one "
     "eager step takes them in together (0: take them in every step)"),
    ("--max-queue", "max_queue", int, "requests waiting for a slot before 429"),
    ("--max-num-sessions", "max_num_sessions", int, "sessions (in memory and on disk) before 429"),
    ("--max-body-bytes", "max_body_bytes", int, "request body limit (413 above)"),
    ("--max-request-steps", "max_request_steps", int, "input steps + max_tokens of one request (413 above)"),
    ("--max-batch-sequences", "max_batch_sequences", int, "sequences in one /v1/forward or completions request"),
    ("--max-ws-frame-bytes", "max_ws_frame_bytes", int, "websocket frame limit"),
    ("--session-ttl", "session_ttl", float, "seconds idle before a session is spilled to disk"),
    ("--state-dir", "state_dir", str, "where sessions are written through and persist across restarts"),
    ("--state-store", "state_store", str,
     "redis://[:password@]host:port/db (or rediss://): sessions in Redis, shared by replicas; unset: --state-dir"),
    ("--state-store-mode", "state_store_mode", str,
     "sync: answer after the store has the session's new state; async: answer first (loses the last writes "
     "in flight on a crash)"),
    ("--state-lease-ttl", "state_lease_ttl", float,
     "seconds before a dead replica's sessions may be taken over by another (Redis store)"),
    ("--replica-id", "replica_id", str, "this replica's name on its session leases (default hostname-pid-random)"),
    ("--snapshot-every", "snapshot_every", int, "steps a session logs before its state is snapshotted"),
    ("--torch-threads", "torch_threads", int,
     "the engine process's torch threads (0: on a CPU, the CPUs left after one per frontend; with a GPU, torch's)"),
    ("--api-server-count", "api_server_count", int,
     "HTTP frontend processes sharing the port (one engine); 0: one per 4 CPUs, at most 4"),
    ("--max-response-bytes", "max_response_bytes", int, "estimated size of one answer's outputs (413 above)"),
    ("--api-key", "api_key", str, "bearer token required on /v1 routes and the websocket"),
    ("--served-model-name", "served_model_name", str, "model id in /v1/models and completions"),
    ("--shutdown-timeout", "shutdown_timeout", float, "seconds to drain requests on shutdown"),
    ("--cuda-graphs", "cuda_graphs", _flag, "replay CUDA graphs for decode-only steps on a GPU (true/false)"),
    ("--prefill-graphs", "prefill_graphs", _flag,
     "replay CUDA graphs for steps whose chunks are all 64 steps or shorter too (true/false; with --cuda-graphs)"),
    ("--async-scheduling", "async_scheduling", _flag_or_auto,
     "launch each engine step before the last one's tokens reach the host, feeding them from the device (true, "
     "false, or auto: on where the device's decode step outlasts the host's work around it, measured at warm-up)"),
    ("--ws-compression", "ws_compression", _flag,
     "accept permessage-deflate on the websocket when a client offers it (true/false)"),
)


def _serve(args: argparse.Namespace) -> int:
    from server.config import ServerConfig
    from server.serve import serve

    values = {field: getattr(args, field) for _, field, _, _ in SERVE_FLAGS if getattr(args, field) is not None}
    try:
        config = ServerConfig(**values)
    except ValueError as exc:
        print(f"infomamba serve: {exc}", file=sys.stderr)
        return 2
    return serve(config, args.model, log_level=args.log_level)


class _EnvValue(str):
    """A flag's default read from the environment. argparse converts a string default with the flag's type only
    when the flag is missing from the command line of the subcommand being run, so a bad value is reported by
    that subcommand alone (never by --help or another subcommand), and the message names the variable."""

    env: str


def _env(field: str) -> _EnvValue | None:
    name = "INFOMAMBA_" + field.upper()
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    default = _EnvValue(value)
    default.env = name
    return default


def _typed(kind):
    """`kind`, with a message naming the environment variable when the value came from one."""

    def convert(value: str):
        try:
            return kind(value)
        except ValueError:
            if isinstance(value, _EnvValue):
                raise argparse.ArgumentTypeError(
                    f"{value.env}={str(value)!r} is not a valid {kind.__name__}") from None
            raise

    convert.__name__ = kind.__name__  # argparse's own message for a bad command-line value
    return convert


LOG_LEVELS = ("debug", "info", "warning", "error")


def _log_level(value: str) -> str:
    if value not in LOG_LEVELS:
        raise ValueError(value)
    return value


_log_level.__name__ = "log level (" + ", ".join(LOG_LEVELS) + ")"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("infomamba-serve")
    except PackageNotFoundError:  # a source checkout on PYTHONPATH, not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infomamba", description="InfoMamba Serve: a recurrent-state model server.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="convert a Hugging Face MambaForCausalLM directory to InfoMamba (k = 0)")
    convert.add_argument("src", help="directory with config.json and model.safetensors")
    convert.add_argument("dst", help="output model directory")
    convert.add_argument("--name", default=None, help="model name (default: the source directory's name)")
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.set_defaults(func=_convert)
    serve = sub.add_parser("serve", help="run the HTTP/websocket server (flags also read INFOMAMBA_* env vars)")
    serve.add_argument("--model", default=os.environ.get("INFOMAMBA_MODEL") or None,
                       help="model directory (default: the bundled model, else a random tiny one)")
    for flag, field, kind, help_text in SERVE_FLAGS:
        serve.add_argument(flag, dest=field, type=_typed(kind), default=_env(field),
                           help=f"{help_text} [env INFOMAMBA_{field.upper()}]")
    serve.add_argument("--log-level", type=_typed(_log_level), default=_env("log_level") or "info",
                       help=f"one of {', '.join(LOG_LEVELS)} [env INFOMAMBA_LOG_LEVEL]")
    serve.set_defaults(func=_serve)
    from clients.commands import add_client_commands

    add_client_commands(sub)  # generate, stream, bench
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
