"""A redis-server of the test's own, for fault injection (SIGSTOP, kill -9, restart).

Never pause or kill the shared stack's Redis: other sessions use it. This one runs on a
free port with the local stack's own configuration (``deploy/local/stack.py``
``redis_config``: append-only file, fsync every second), its data in the test's tmp dir,
in the foreground so that its pid is the server's.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis

from tests.integration.processes import free_port

REPO = Path(__file__).resolve().parents[2]


def stack_module() -> Any:
    """``deploy/local/stack.py`` imported as a module (it is a script, not a package)."""
    name = "weir_local_stack"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "deploy/local/stack.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class PrivateRedis:
    """``redis-server`` on a free 127.0.0.1 port with its data in ``data_dir``."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.dir = data_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.conf = self.dir / "redis.conf"
        self.log = self.dir / "redis.log"
        self.conf.write_text(stack_module().redis_config(self.port, self.dir, self.log))
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, timeout: float = 5.0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout)

    def start(self, timeout: float = 20.0) -> None:
        program = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [program, str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            client = self.client(timeout=1.0)
            try:
                if client.ping():
                    return
            except redis.RedisError:
                pass
            finally:
                client.close()
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self.log.read_text(errors="replace") if self.log.exists() else ""
                raise RuntimeError(f"private redis-server on port {self.port} did not start:\n{log[-2000:]}")
            time.sleep(0.1)

    def _signal(self, sig: int) -> None:
        assert self.proc is not None and self.proc.poll() is None, "the private redis-server is not running"
        os.kill(self.proc.pid, sig)

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGCONT)  # a paused server cannot stop
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
