"""Defaults of the server's config that depend on the host: frontends and the engine's torch threads."""
import os

import torch

from server.config import ServerConfig
from server.engine.process import set_torch_threads


def test_frontend_count_defaults_to_one_per_four_cpus_at_most_four(monkeypatch):
    for cpus, expected in ((2, 1), (8, 2), (16, 4), (64, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)))
        assert ServerConfig().num_api_servers == expected
    assert ServerConfig(api_server_count=3).num_api_servers == 3


def test_the_cpu_engine_leaves_one_cpu_per_frontend(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    before = torch.get_num_threads()
    try:
        set_torch_threads(ServerConfig(), "cpu")  # 2 CPUs, 1 frontend: torch's default (2) fought the frontend
        assert torch.get_num_threads() == 1
        set_torch_threads(ServerConfig(torch_threads=2), "cpu")
        assert torch.get_num_threads() == 2
        torch.set_num_threads(3)
        set_torch_threads(ServerConfig(), "cuda")  # with a GPU, torch's default stays
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
