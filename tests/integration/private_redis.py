"""A redis-server of the test's own, for fault injection (SIGSTOP, kill -9, restart).

Never pause or kill the shared stack's Redis: other sessions use it. This one runs on a
free port with the local stack's own configuration (``deploy/local/stack.py``
``redis_config``: append-only file, fsync every second), its data in the test's tmp dir,
in the foreground so that its pid is the server's. Every test that needs a Redis of its
own uses this one (the fault suite, the worker, learner and monitor fault tests, the
secrets test with ``password``).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import redis

from tests.integration.processes import free_port
from tests.local_scripts import deploy_script


def stack_module() -> Any:
    """``deploy/local/stack.py`` imported as a module (it is a script, not a package)."""
    return deploy_script("stack")


def terminate(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """Stop a private server cleanly: SIGCONT (a paused server cannot stop), SIGTERM, and
    SIGKILL if it is still there after ``timeout`` s."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGCONT)
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class PrivateRedis:
    """``redis-server`` on a free 127.0.0.1 port with its data in ``data_dir``; started
    by the constructor. With ``password`` it refuses clients without it (``requirepass``)
    and :attr:`url` and :meth:`client` carry it."""

    def __init__(self, data_dir: Path, port: int | None = None, password: str | None = None) -> None:
        self.dir = data_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password = password
        self.conf = self.dir / "redis.conf"
        self.log = self.dir / "redis.log"
        conf = stack_module().redis_config(self.port, self.dir, self.log)
        self.conf.write_text(conf + (f"requirepass {password}\n" if password else ""))
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self, timeout: float = 5.0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=timeout)

    def ping(self) -> bool:
        client = self.client(timeout=1.0)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def start(self, timeout: float = 20.0) -> None:
        stack = stack_module()
        self.proc = stack.launch_redis(self.conf)
        stack.wait_redis(self.proc, self.ping, timeout, f"private redis-server on port {self.port}", self.log)

    def signal(self, sig: int) -> None:
        assert self.proc is not None and self.proc.poll() is None, "the private redis-server is not running"
        os.kill(self.proc.pid, sig)

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM: Redis fsyncs its append-only file and exits."""
        terminate(self.proc, 20)
