"""`infomamba generate | stream | bench` end to end against a real server on 127.0.0.1."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from clients.cli import build_parser, main
from clients.client import InfoMambaClient

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-4


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


# --- the command itself ------------------------------------------------------------------------------------------

def test_version(capsys):
    from importlib.metadata import PackageNotFoundError, version

    try:
        expected = version("infomamba-serve")
    except PackageNotFoundError:
        expected = "unknown (not installed)"
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"infomamba {expected}\n"


def test_a_bad_env_var_is_reported_only_by_the_subcommand_that_reads_it(monkeypatch, capsys):
    monkeypatch.setenv("INFOMAMBA_PORT", "eighty")
    monkeypatch.setenv("INFOMAMBA_CUDA_GRAPHS", "maybe")
    monkeypatch.setenv("INFOMAMBA_LOG_LEVEL", "loud")
    for argv in (["--help"], ["serve", "--help"], ["bench", "--help"], ["convert", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0, argv
    capsys.readouterr()
    assert build_parser().parse_args(["bench", "--requests", "3"]).requests == 3
    with pytest.raises(SystemExit) as exit_:
        main(["serve"])  # fails while parsing: no server starts
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "infomamba serve: error:" in err and "INFOMAMBA_PORT='eighty'" in err
    # a flag on the command line wins over its variable, which is then never parsed
    args = build_parser().parse_args(["serve", "--port", "9000", "--cuda-graphs", "off", "--log-level", "debug"])
    assert (args.port, args.cuda_graphs, args.log_level) == (9000, False, "debug")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--port", "9000", "--log-level", "debug"])
    assert "INFOMAMBA_CUDA_GRAPHS='maybe' is not a valid boolean" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--port", "9000", "--cuda-graphs", "on"])
    assert "INFOMAMBA_LOG_LEVEL='loud'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--port", "x"])
    assert "argument --port: invalid int value: 'x'" in capsys.readouterr().err


def test_valid_env_vars_are_typed_like_their_flags(monkeypatch):
    monkeypatch.setenv("INFOMAMBA_PORT", "8123")
    monkeypatch.setenv("INFOMAMBA_SESSION_TTL", "2.5")
    monkeypatch.setenv("INFOMAMBA_CUDA_GRAPHS", "false")
    monkeypatch.setenv("INFOMAMBA_LOG_LEVEL", "warning")
    args = build_parser().parse_args(["serve"])
    assert type(args.port) is int and args.port == 8123
    assert type(args.session_ttl) is float and args.session_ttl == 2.5
    assert args.cuda_graphs is False and args.log_level == "warning"
    monkeypatch.delenv("INFOMAMBA_LOG_LEVEL")
    assert build_parser().parse_args(["serve"]).log_level == "info"


# --- generate ---------------------------------------------------------------------------------------------------

def test_generate_streams_the_completion(lm_server, capsys):
    with InfoMambaClient(lm_server.url) as c:
        expected = c.completions("Hello", max_tokens=7, temperature=0.0)["choices"][0]["text"]
    rc, out, err = run(capsys, "generate", "Hello", "--max-tokens", "7", "--temperature", "0", "--url", lm_server.url)
    assert rc == 0 and out == expected + "\n", err
    rc, out, _ = run(capsys, "generate", "Hello", "--max-tokens", "7", "--temperature", "0", "--no-stream",
                     "--url", lm_server.url)
    assert rc == 0 and out == expected + "\n"


def test_generate_reads_the_url_and_key_from_the_environment(auth_server, capsys, monkeypatch):
    monkeypatch.setenv("INFOMAMBA_URL", auth_server.url)
    rc, _, err = run(capsys, "generate", "Hi", "--max-tokens", "2")
    assert rc == 1 and "401 unauthorized" in err
    monkeypatch.setenv("INFOMAMBA_API_KEY", auth_server.config.api_key)
    args = build_parser().parse_args(["bench"])
    assert args.url == auth_server.url and args.api_key == auth_server.config.api_key
    rc, out, err = run(capsys, "generate", "Hi", "--max-tokens", "2", "--seed", "3", "--top-k", "5")
    assert rc == 0 and len(out) >= 1, err


def test_generate_reports_errors(lm_server, capsys):
    rc, _, err = run(capsys, "generate", "Hello", "--max-tokens", "0", "--url", lm_server.url)
    assert rc == 1 and "infomamba generate: 422" in err and "max_tokens" in err


def test_the_installed_command_runs(lm_server):
    """The real entry point, in a fresh process, with the prompt on standard input."""
    result = subprocess.run([sys.executable, "-m", "clients.cli", "generate", "-", "--max-tokens", "3",
                             "--temperature", "0", "--url", lm_server.url], input="Hey", capture_output=True,
                            text=True, cwd=ROOT, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) >= 2


# --- stream -----------------------------------------------------------------------------------------------------

def test_stream_a_text_file_matches_one_forward_pass(lm_server, capsys, tmp_path):
    text = "It was the best of times, it was the worst of times. " * 4
    source = tmp_path / "book.txt"
    source.write_text(text)
    out = tmp_path / "logits.npy"
    rc, _, err = run(capsys, "stream", str(source), "--chunk-size", "37", "--out", str(out), "--outputs", "logits",
                     "--url", lm_server.url)
    assert rc == 0, err
    assert f"{len(text)} chars fed" in err
    assert "book.txt: 100%" in err and f"{len(text)}/{len(text)}" in err  # the progress bar
    with InfoMambaClient(lm_server.url) as c:
        whole = np.asarray(c.forward(text=text, outputs=["logits"])["results"][0]["logits"])
    got = np.load(out)
    assert got.shape == whole.shape == (len(text), 260)
    np.testing.assert_allclose(got, whole, atol=ATOL)


def test_stream_snapshot_and_resume_carry_on_where_it_stopped(lm_server, capsys, tmp_path):
    ids = np.random.default_rng(0).integers(0, 256, 300)
    np.save(tmp_path / "head.npy", ids[:200])
    np.save(tmp_path / "full.npy", ids)
    snap = tmp_path / "state.safetensors"
    rc, _, err = run(capsys, "stream", str(tmp_path / "head.npy"), "--chunk-size", "64", "--snapshot", str(snap),
                     "--snapshot-every", "1", "--quiet", "--url", lm_server.url)
    assert rc == 0, err
    assert "%" not in err  # --quiet: no progress bar
    meta = json.loads(Path(str(snap) + ".json").read_text())
    assert meta["offset"] == 200 and meta["steps"] == 200 and snap.stat().st_size > 0
    # the file grew: resume from the snapshot and feed only the new 100 steps
    out = tmp_path / "rest.safetensors"
    rc, _, err = run(capsys, "stream", str(tmp_path / "full.npy"), "--resume", str(snap), "--out", str(out),
                     "--outputs", "logits,hidden", "--chunk-size", "33", "--url", lm_server.url)
    assert rc == 0, err
    assert "session at 300 steps" in err
    saved = load_file(str(out))
    with InfoMambaClient(lm_server.url) as c:
        whole = c.forward(input_ids=[ids.tolist()], outputs=["logits", "hidden"])["results"][0]
    np.testing.assert_allclose(saved["logits"], np.asarray(whole["logits"])[200:], atol=ATOL)
    np.testing.assert_allclose(saved["hidden"], np.asarray(whole["hidden"])[200:], atol=ATOL)


def test_stream_float_vectors_and_keep_the_session(float_server, capsys, tmp_path):
    x = np.random.default_rng(1).standard_normal((50, 6)).astype(np.float32)
    np.save(tmp_path / "signal.npy", x)
    out = tmp_path / "head.npy"
    rc, _, err = run(capsys, "stream", str(tmp_path / "signal.npy"), "--chunk-size", "16", "--out", str(out),
                     "--keep", "--url", float_server.url)
    assert rc == 0, err
    session_id = err.split("session ", 1)[1].split()[0]
    with InfoMambaClient(float_server.url) as c:
        whole = np.asarray(c.forward(inputs=[x], outputs=["head"])["results"][0]["head"])
        np.testing.assert_allclose(np.load(out), whole, atol=ATOL)
        assert c.session(session_id).append(inputs=x[:1], outputs=[])["steps"] == 51  # kept, and still live
        c.delete_session(session_id)


def test_stream_rejects_bad_arguments(lm_server, capsys, tmp_path):
    (tmp_path / "t.txt").write_text("abc")
    rc, _, err = run(capsys, "stream", str(tmp_path / "missing.txt"), "--url", lm_server.url)
    assert rc == 1 and "missing.txt" in err
    rc, _, err = run(capsys, "stream", str(tmp_path / "t.txt"), "--out", str(tmp_path / "o.npy"),
                     "--outputs", "logits,hidden", "--url", lm_server.url)
    assert rc == 1 and ".safetensors" in err
    rc, _, err = run(capsys, "stream", str(tmp_path / "t.txt"), "--outputs", "bogus", "--url", lm_server.url)
    assert rc == 1 and "bogus" in err
    np.save(tmp_path / "bad.npy", np.array([1, 999]))
    rc, _, err = run(capsys, "stream", str(tmp_path / "bad.npy"), "--quiet", "--url", lm_server.url)
    assert rc == 1 and "token_out_of_vocabulary" in err


# --- bench ------------------------------------------------------------------------------------------------------

def test_bench_completions(lm_server, capsys):
    rc, out, err = run(capsys, "bench", "--requests", "6", "--concurrency", "3", "--prompt-len", "8",
                       "--max-tokens", "4", "--json", "--url", lm_server.url)
    assert rc == 0, err
    assert err.startswith("bench: 6 completions requests (8 input steps, 4 tokens each) at concurrency 3")
    assert "6/6" in err and "ok=6" in err  # the progress bar and its running results, on stderr
    result = json.loads(out)
    assert result["interrupted"] is False
    assert result["mode"] == "completions" and result["ok"] == 6 and result["failed"] == 0
    assert result["generated_tokens_per_s"] > 0 and result["input_steps_per_s"] > 0
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        p = result[key]
        assert 0 < p["p50"] <= p["p90"] <= p["p99"], key
    rc, out, _ = run(capsys, "bench", "--requests", "2", "--prompt", "Hello", "--max-tokens", "3",
                     "--url", lm_server.url)
    assert rc == 0 and "time to first" in out and "req/s" in out


def test_bench_forward_on_a_float_model(float_server, capsys):
    rc, out, err = run(capsys, "bench", "--requests", "4", "--concurrency", "2", "--prompt-len", "16",
                       "--url", float_server.url)
    assert rc == 0, err
    assert out.startswith("mode forward: 4/4 ok") and "end to end" in out


def test_bench_counts_failures(auth_server, capsys):
    rc, _, err = run(capsys, "bench", "--requests", "2", "--url", auth_server.url)
    assert rc == 1 and "401" in err
    rc, out, _ = run(capsys, "bench", "--requests", "2", "--concurrency", "2", "--prompt-len", "4",
                     "--max-tokens", "2", "--api-key", auth_server.config.api_key, "--url", auth_server.url)
    assert rc == 0 and "2/2 ok" in out


def test_bench_interrupted_prints_what_finished(lm_server, capsys, monkeypatch):
    import asyncio
    import signal

    import clients.commands as commands

    real, calls = commands._bench_one, []

    async def stop_at_the_fourth(*args):
        calls.append(1)
        if len(calls) == 4:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C: asyncio.run cancels the run, then raises KeyboardInterrupt
            await asyncio.sleep(30)
        await real(*args)

    monkeypatch.setattr(commands, "_bench_one", stop_at_the_fourth)
    # Ctrl-C as a terminal delivers it: Python's own handler, whatever an earlier test in this process left (asyncio
    # steps in only over that one; one CI run saw the interrupt ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        rc, out, err = run(capsys, "bench", "--requests", "10", "--concurrency", "1", "--prompt-len", "4",
                           "--max-tokens", "2", "--quiet", "--url", lm_server.url)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert rc == 130, (out, err)
    assert out.startswith("mode completions: 3/10 ok, 0 failed") and "interrupted: partial results" in out
    assert "time to first" in out and err == ""


@pytest.mark.parametrize("argv", [["bench", "--requests", "0"], ["bench", "--concurrency", "0"]])
def test_bench_rejects_bad_arguments(argv, capsys):
    rc, _, err = run(capsys, *argv)
    assert rc == 1 and "must be >= 1" in err
