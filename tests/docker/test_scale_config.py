"""Scale-out deployment files: docker/compose.scale.yaml passes `docker compose config`, its Prometheus config passes
promtool, docker/nginx passes `nginx -t` and its replica list renders from DNS, and docker/k8s/ passes
kubernetes-validate (offline, strict) with the proxy's ConfigMap holding docker/nginx's files unchanged.

Run as a script to regenerate docker/k8s/proxy-config.yaml after editing docker/nginx/."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
NGINX = DOCKER / "nginx"
K8S = DOCKER / "k8s"
COMPOSE_SCALE = DOCKER / "compose.scale.yaml"
COMPOSE_CPU = DOCKER / "compose.cpu.yaml"
PROMETHEUS_SCALE = DOCKER / "prometheus" / "prometheus.scale.yml"
CONFIGMAP = K8S / "proxy-config.yaml"
NGINX_FILES = ("nginx.conf", "infomamba.conf", "render-upstreams.sh")


def configmap_text() -> str:
    lines = ["# docker/nginx's files, unchanged (tests/docker/test_scale_config.py checks it). After editing them:",
             "#   python tests/docker/test_scale_config.py",
             "apiVersion: v1", "kind: ConfigMap", "metadata:", "  name: infomamba-nginx",
             "  labels: {app.kubernetes.io/name: infomamba-proxy, app.kubernetes.io/part-of: infomamba}", "data:"]
    for name in NGINX_FILES:
        lines.append(f"  {name}: |")
        lines += ["    " + line if line else "" for line in (NGINX / name).read_text().splitlines()]
    return "\n".join(lines) + "\n"


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


# --- compose ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("files", [[COMPOSE_SCALE], [COMPOSE_SCALE, COMPOSE_CPU]], ids=["gpu", "cpu"])
def test_compose_scale_config_is_valid(files):
    from tests.docker.test_docker_config import _compose_cmd

    args = [a for f in files for a in ("-f", str(f))]
    result = _run(_compose_cmd() + args + ["config", "--format", "json"], cwd=DOCKER)
    assert result.returncode == 0, f"docker compose config:\n{result.stderr}"
    services = json.loads(result.stdout)["services"]
    assert set(services) >= {"redis", "server", "proxy", "prometheus"}
    assert "--appendonly" in services["redis"]["command"]
    server = services["server"]
    assert server["environment"]["INFOMAMBA_STATE_STORE"] == "redis://redis:6379/0"
    assert "ports" not in server, "replicas are reached through the proxy only (and --scale needs no fixed port)"
    assert services["proxy"]["environment"]["INFOMAMBA_UPSTREAM"] == "server"
    for volume in services["proxy"]["volumes"] + services["prometheus"]["volumes"]:
        if volume["type"] == "bind":
            assert Path(volume["source"]).exists(), f"bind source {volume['source']} is missing"


def test_prometheus_scale_config_finds_replicas_by_dns():
    import shutil

    promtool = shutil.which("promtool")
    if promtool is None:
        from tests.docker.test_docker_config import _missing

        _missing("promtool", "apt-get install prometheus")
    result = _run([promtool, "check", "config", str(PROMETHEUS_SCALE)])
    assert result.returncode == 0, f"promtool:\n{result.stdout}{result.stderr}"
    assert "dns_sd_configs" in PROMETHEUS_SCALE.read_text()


# --- per-replica Grafana panels ---------------------------------------------------------------------------------

DASHBOARD = DOCKER / "grafana" / "dashboards" / "infomamba.json"
PER_REPLICA = {"Throughput by replica": "infomamba:prompt_tokens_total",
               "Sessions held by replica": "infomamba:sessions_live",
               "Lease takeovers": "infomamba:state_store_sessions_taken_total",
               "State store write latency by replica": "infomamba:state_store_log_write_seconds_bucket"}


def _panels() -> list[dict]:
    return json.loads(DASHBOARD.read_text())["panels"]


def _as_prometheus(expr: str) -> str:
    """A dashboard query as Prometheus reads it, Grafana's variables filled in."""
    return expr.replace("$__rate_interval", "1m").replace('"$job"', '".*"').replace('"$replica"', '".*"')


def _promtool() -> str:
    import shutil

    promtool = shutil.which("promtool")
    if promtool is None:
        from tests.docker.test_docker_config import _missing

        _missing("promtool", "apt-get install prometheus")
    return promtool


def test_dashboard_has_per_replica_panels_named_by_replica_id():
    panels = {p["title"]: p for p in _panels()}
    templating = json.loads(DASHBOARD.read_text())["templating"]["list"]
    assert any(v["name"] == "replica" and "infomamba:replica_info" in v["definition"] for v in templating)
    for title, metric in PER_REPLICA.items():
        panel = next((p for t, p in panels.items() if t.startswith(title)), None)
        assert panel is not None, f"no panel {title!r}"
        exprs = [t["expr"] for t in panel["targets"]]
        assert any(metric in e for e in exprs), f"{title}: does not query {metric}"
        for expr in exprs:
            assert "by (replica" in expr and "group_left (replica) infomamba:replica_info" in expr, (title, expr)
            assert "{{replica}}" in next(t["legendFormat"] for t in panel["targets"] if t["expr"] == expr)


def test_every_dashboard_query_parses_and_the_per_replica_join_computes_by_replica(tmp_path):
    """promtool parses every query (as recording rules), and evaluates the throughput panel's query over two
    scraped replicas' series: one line per replica, named by its --replica-id."""
    import yaml

    promtool = _promtool()
    exprs = [t["expr"] for p in _panels() for t in p.get("targets", [])]
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query{i}", "expr": _as_prometheus(e)}
                                                        for i, e in enumerate(exprs)]}]}
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    result = _run([promtool, "check", "rules", str(tmp_path / "rules.yml")])
    assert result.returncode == 0, f"promtool check rules:\n{result.stdout}{result.stderr}"

    throughput = next(p for p in _panels() if p["title"].startswith("Throughput by replica"))["targets"][0]["expr"]
    series = []
    for instance, replica, prompt, generated in (("10.0.0.1:8000", "r1", 150, 15), ("10.0.0.2:8000", "r2", 30, 0)):
        labels = f'job="infomamba", instance="{instance}"'
        series += [{"series": f"infomamba:prompt_tokens_total{{{labels}}}", "values": f"0+{prompt}x40"},
                   {"series": f"infomamba:generation_tokens_total{{{labels}}}", "values": f"0+{generated}x40"},
                   {"series": f'infomamba:replica_info{{{labels}, replica="{replica}"}}', "values": "1x40"}]
    test = {"rule_files": [], "evaluation_interval": "15s",
            "tests": [{"interval": "15s", "input_series": series,
                       "promql_expr_test": [{"expr": _as_prometheus(throughput), "eval_time": "5m",
                                             "exp_samples": [{"labels": '{replica="r1"}', "value": 11},
                                                             {"labels": '{replica="r2"}', "value": 2}]}]}]}
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test))
    result = _run([promtool, "test", "rules", str(tmp_path / "test.yml")])
    assert result.returncode == 0, f"promtool test rules:\n{result.stdout}{result.stderr}"


# --- nginx ------------------------------------------------------------------------------------------------------

def test_nginx_config_passes_nginx_t(tmp_path):
    from tests.server.scale import nginx_command, render_nginx

    conf = render_nginx(tmp_path / "nginx", 18080, ["127.0.0.1:8001", "127.0.0.1:8002"])
    result = _run(nginx_command(conf, "-t"))
    assert result.returncode == 0, f"nginx -t:\n{result.stdout}{result.stderr}"
    text = (NGINX / "infomamba.conf").read_text()
    assert re.search(r"^\s*hash \$infomamba_session_key consistent;", text, re.M)


def test_render_upstreams_lists_every_address_of_the_name(tmp_path):
    out = tmp_path / "upstream-servers.conf"
    env = {**os.environ, "INFOMAMBA_UPSTREAM": "localhost", "INFOMAMBA_UPSTREAM_PORT": "8123",
           "INFOMAMBA_UPSTREAM_FILE": str(out), "INFOMAMBA_UPSTREAM_REFRESH": "0"}
    result = _run(["sh", str(NGINX / "render-upstreams.sh")], env=env)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == "server 127.0.0.1:8123;\n"
    assert os.access(NGINX / "render-upstreams.sh", os.X_OK), "nginx's entrypoint runs only executable scripts"


# --- Kubernetes -------------------------------------------------------------------------------------------------

def test_k8s_manifests_pass_kubernetes_validate():
    binary = Path(sys.executable).parent / "kubernetes-validate"
    if not binary.exists():
        from tests.docker.test_docker_config import _missing

        _missing("kubernetes-validate", "pip install -e '.[test]'")
    files = sorted(K8S.glob("*.yaml"))
    assert {f.name for f in files} >= {"redis.yaml", "server.yaml", "proxy.yaml", "proxy-config.yaml"}
    result = _run([str(binary), "--strict", *map(str, files)])
    assert result.returncode == 0, f"kubernetes-validate:\n{result.stdout}{result.stderr}"


def test_k8s_proxy_config_is_docker_nginx_unchanged():
    assert CONFIGMAP.read_text() == configmap_text(), "run: python tests/docker/test_scale_config.py"


def test_k8s_replicas_use_the_redis_store_and_ready_probes():
    text = (K8S / "server.yaml").read_text()
    assert "INFOMAMBA_STATE_STORE" in text and "redis://infomamba-redis:6379" in text
    assert re.search(r"readinessProbe:\s*\n\s*httpGet: \{path: /ready", text)
    assert "clusterIP: None" in text, "the proxy finds the replicas through a headless Service"
    assert "INFOMAMBA_UPSTREAM\n              value: infomamba-replicas" in (K8S / "proxy.yaml").read_text()
    from clients.cli import SERVE_FLAGS

    fields = {field for _, field, _, _ in SERVE_FLAGS}
    for name in re.findall(r"name: INFOMAMBA_([A-Z_]+)", text):
        assert name.lower() in fields, f"server.yaml sets INFOMAMBA_{name}, which `infomamba serve` does not read"


if __name__ == "__main__":
    CONFIGMAP.write_text(configmap_text())
    print(f"wrote {CONFIGMAP.relative_to(ROOT)}")
