"""Real servers on 127.0.0.1 for the client tests, started with the server tests' helpers (tests/server/conftest.py,
loaded by path under its own name so it never shadows the `server` package)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from model.tokenizer import ByteTokenizer

_spec = importlib.util.spec_from_file_location("infomamba_server_testing",
                                               Path(__file__).resolve().parents[1] / "server" / "conftest.py")
server_testing = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(server_testing)

API_KEY = "test-key-123"


@pytest.fixture(scope="session")
def lm_server():
    with server_testing.running(server_testing.tiny_lm(), ByteTokenizer(), max_num_streams=16,
                                max_num_batched_tokens=256) as srv:
        yield srv


@pytest.fixture(scope="session")
def float_server():
    with server_testing.running(server_testing.tiny_float(), None, max_num_streams=8,
                                max_num_batched_tokens=64) as srv:
        yield srv


@pytest.fixture(scope="session")
def auth_server():
    with server_testing.running(server_testing.tiny_lm(), ByteTokenizer(), max_num_streams=4,
                                max_num_batched_tokens=64, api_key=API_KEY) as srv:
        yield srv
