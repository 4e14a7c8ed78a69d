"""A real Prometheus server scrapes /metrics every second and sees the counters move."""
import shutil
import subprocess
import time

import httpx
import pytest

from tests.server.conftest import free_port

PROMETHEUS = shutil.which("prometheus")


def query(prom_url: str, expr: str) -> float | None:
    r = httpx.get(prom_url + "/api/v1/query", params={"query": expr}, timeout=5)
    result = r.json()["data"]["result"]
    return float(result[0]["value"][1]) if result else None


@pytest.mark.skipif(PROMETHEUS is None, reason="the prometheus binary is not installed (apt-get install prometheus)")
def test_prometheus_scrapes_and_counters_move(lm_server, tmp_path):
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(f"""
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: infomamba
    scrape_interval: 1s
    static_configs:
      - targets: ["127.0.0.1:{lm_server.port}"]
""")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    prom = f"http://127.0.0.1:{port}"
    try:
        expr = 'sum(infomamba:http_requests_total{route="/v1/completions",status="200"})'
        tokens = "infomamba:generation_tokens_total"

        def wait_for(check, timeout=30.0):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    value = check()
                    if value:
                        return value
                except (httpx.HTTPError, KeyError, ValueError):
                    pass
                time.sleep(0.3)
            raise AssertionError("prometheus never saw the expected value")

        wait_for(lambda: query(prom, 'up{job="infomamba"}') == 1.0)
        httpx.post(lm_server.url + "/v1/completions", json={"prompt": [1, 2], "max_tokens": 3, "temperature": 0})
        before = wait_for(lambda: query(prom, expr))
        tokens_before = query(prom, tokens)
        for _ in range(3):
            httpx.post(lm_server.url + "/v1/completions", json={"prompt": [1, 2], "max_tokens": 3, "temperature": 0})
        wait_for(lambda: (query(prom, expr) or 0) >= before + 3)
        assert query(prom, tokens) >= tokens_before + 9
        assert query(prom, "infomamba:state_slots_total") == lm_server.config.max_num_streams
        assert query(prom, "infomamba:e2e_request_latency_seconds_count") > 0
    finally:
        proc.terminate()
        proc.wait(10)
