"""Real Redis and nginx for the scale-out tests, on free loopback ports. Both come from Debian (`redis-server`,
`nginx`; .ci/run installs them). Missing, a test skips with the reason, or fails under CI=true."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.server.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
NGINX_DIR = ROOT / "docker" / "nginx"


def binary(name: str, package: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)),
                                      None)
    if path is None:
        message = f"{name} not found; install it with: apt-get install {package}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


class RedisServer:
    """redis-server on 127.0.0.1, in memory (no RDB, no AOF: the tests need its sharing, not its disk)."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [binary("redis-server", "redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        import redis

        self.client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.ConnectionError):
                if self.client.ping():
                    break
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(10)


def render_nginx(directory: Path, port: int, upstreams: list[str]) -> Path:
    """docker/nginx's configuration, as shipped, listening on 127.0.0.1:port with the given replicas."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(NGINX_DIR / "nginx.conf", directory / "nginx.conf")
    routes = (NGINX_DIR / "infomamba.conf").read_text()
    routes = routes.replace("listen 8080;", f"listen 127.0.0.1:{port};").replace("listen [::]:8080;\n", "")
    # temporary files inside the prefix: the compiled-in defaults (/var/lib/nginx/...) exist only where the
    # Debian package is installed, not where its binary is carried to
    temp = "".join(f"{kind}_temp_path {directory}/{kind}_temp;\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (directory / "infomamba.conf").write_text(temp + routes)
    (directory / "upstream-servers.conf").write_text("".join(f"server {u};\n" for u in upstreams))
    return directory / "nginx.conf"


def nginx_command(conf: Path, *args: str, foreground: bool = False) -> list[str]:
    prefix = conf.parent
    globals_ = f"pid {prefix}/nginx.pid; error_log {prefix}/error.log warn;"
    if os.geteuid() == 0:
        globals_ += " user root;"  # workers must reach the temporary prefix directory
    if foreground:
        globals_ += " daemon off;"
    return [binary("nginx", "nginx"), "-p", str(prefix), "-c", str(conf), "-g", globals_, *args]


class NginxProxy:
    def __init__(self, upstreams: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="infomamba-nginx-"))
        conf = render_nginx(self.dir, self.port, upstreams)
        self.stderr = open(self.dir / "stderr.log", "w+")  # what nginx says before its error log opens
        self.proc = subprocess.Popen(nginx_command(conf, foreground=True), stdout=subprocess.DEVNULL,
                                     stderr=self.stderr)
        import httpx

        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(self.url + "/health", timeout=2)
                break
            if time.monotonic() > deadline or self.proc.poll() is not None:
                logs = [self.dir / "stderr.log", self.dir / "error.log"]
                raise RuntimeError("nginx did not start: " + "".join(p.read_text()[-2000:] for p in logs if p.exists()))
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)

