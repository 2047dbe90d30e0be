#!/usr/bin/env python3
"""A secure local stack: Kafka over SASL_SSL (SCRAM-SHA-512) and Redis over TLS with an ACL user.

Usage (with the project's virtualenv python)::

    python deploy/local/secure.py up --dir DIR     # start both; print the WEIR_* variables
    python deploy/local/secure.py env --dir DIR    # print them again
    python deploy/local/secure.py down --dir DIR   # stop both

From Python (tests/integration/test_secure_transport.py)::

    with secure_stack(tmp_path) as st:
        env = st.env()          # WEIR_* variables, secrets included

It runs beside the shared local stack (``deploy/local/stack.py``, whose ``Kafka`` class
and Maven-fetched jars it reuses), never on its ports: every port is a free one picked
on 127.0.0.1, and everything (CA, keys, passwords, data, logs) lives in DIR.

* **TLS.** ``openssl`` makes a CA and a server certificate for ``127.0.0.1`` and
  ``localhost`` signed by it (``DIR/tls``); clients trust ``DIR/tls/ca.pem``. Kafka reads
  PEM directly (``ssl.keystore.type=PEM``): no keytool.
* **Kafka.** One KRaft node. Its only client listener is ``SASL_SSL`` with
  ``SCRAM-SHA-512``; the controller listener is ``SSL`` (no SASL: KRaft controllers do
  not take SCRAM). Two SCRAM users are made when the storage is formatted
  (``kafka-storage format --add-scram``): ``admin`` (inter-broker) and ``weir`` (clients).
  There is no authorizer: an authenticated user may do anything (ACLs per principal are
  the operator's part, docs/security.md).
* **Redis.** ``port 0`` (no plaintext port) and ``tls-port``; clients need no certificate
  (``tls-auth-clients no``) but must log in: the ``default`` user is off, the ``weir``
  user has a password and reaches only keys ``weir:*``.

The passwords are random, kept in ``DIR/secrets.json`` and ``DIR/weir.env`` (mode 0600).
Only for tests and trying things out: the CA key sits next to the certificates, and the
SCRAM passwords pass on the format command line (a second, on this host).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
MECHANISM = "SCRAM-SHA-512"
#: The SCRAM and Redis ACL user Weir logs in as; ``admin`` is Kafka's inter-broker user.
USER = "weir"
ADMIN = "admin"
REDIS_READY_TIMEOUT = 20.0
STOP_TIMEOUT = 30.0


def _stack() -> Any:
    """``deploy/local/stack.py`` as a module, under the name tests use for it too."""
    name = "weir_local_stack"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "stack.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


stack = _stack()
StackFailure = stack.StackFailure


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by this user only (it holds secrets)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


# -- certificates -----------------------------------------------------------------------------


class Tls:
    """A CA and a server certificate it signed (SAN ``IP:127.0.0.1``, ``DNS:localhost``),
    made with ``openssl`` in ``dir`` on first use."""

    def __init__(self, dir: Path) -> None:
        self.dir = dir
        self.ca = dir / "ca.pem"
        self.ca_key = dir / "ca.key"
        self.cert = dir / "server.pem"
        self.key = dir / "server.key"
        #: key and certificate chain in one PEM file, for Kafka's PEM keystore
        self.keystore = dir / "server-keystore.pem"

    def ensure(self) -> None:
        if self.keystore.exists():
            return
        openssl = shutil.which("openssl")
        if openssl is None:
            raise StackFailure("openssl is missing; install it with `sudo apt-get install -y openssl`")
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)

        def run(*args: str) -> None:
            res = subprocess.run([openssl, *args], capture_output=True, text=True)
            if res.returncode != 0:
                raise StackFailure(f"`openssl {' '.join(args)}` failed:\n{res.stderr}")

        days = "30"
        run(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", days,
            "-keyout", str(self.ca_key), "-out", str(self.ca), "-subj", "/CN=weir-local-secure-ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        csr = self.dir / "server.csr"
        run(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key),
            "-out", str(csr), "-subj", "/CN=127.0.0.1",
        )  # fmt: skip
        ext = self.dir / "server.ext"
        ext.write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid,issuer\n"
        )
        run(
            "x509", "-req", "-in", str(csr), "-CA", str(self.ca), "-CAkey", str(self.ca_key),
            "-CAcreateserial", "-days", days, "-out", str(self.cert), "-extfile", str(ext),
        )  # fmt: skip
        for key in (self.ca_key, self.key):
            os.chmod(key, 0o600)
        write_private(self.keystore, self.key.read_text() + self.cert.read_text() + self.ca.read_text())


# -- servers ----------------------------------------------------------------------------------


def _set_properties(text: str, values: dict[str, str]) -> str:
    """``text`` (a .properties file) with each key of ``values`` set: replaced where it is,
    appended otherwise."""
    lines = text.splitlines()
    left = dict(values)
    for i, line in enumerate(lines):
        key = line.split("=", 1)[0].strip()
        if not line.lstrip().startswith("#") and key in left:
            lines[i] = f"{key}={left.pop(key)}"
    if left:
        lines.append("\n# Secure listener (deploy/local/secure.py)")
        lines += [f"{k}={v}" for k, v in left.items()]
    return "\n".join(lines) + "\n"


class SecureKafka(stack.Kafka):  # type: ignore[misc,name-defined]
    """The local stack's broker (jars, layout, readiness) with a SASL_SSL client listener."""

    def __init__(self, port: int, controller_port: int, state: Path, tls: Tls, passwords: dict[str, str]):
        super().__init__(port, controller_port, state=state, logs=state)
        self.name = "secure-kafka"
        self.tls = tls
        self.passwords = passwords

    def format_args(self) -> list[str]:
        return [
            arg
            for user in (ADMIN, USER)
            for arg in (
                "--add-scram",
                f"{MECHANISM}=[name={user},password={self.passwords[f'kafka_{user}']}]",
            )
        ]

    def write_config(self) -> None:
        super().write_config()
        jaas = (
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{ADMIN}" password="{self.passwords["kafka_admin"]}";'
        )
        text = _set_properties(
            self.props.read_text(),
            {
                "listeners": f"SASL_SSL://{HOST}:{self.port},CONTROLLER://{HOST}:{self.controller_port}",
                "advertised.listeners": f"SASL_SSL://{HOST}:{self.port}",
                "listener.security.protocol.map": "SASL_SSL:SASL_SSL,CONTROLLER:SSL",
                "inter.broker.listener.name": "SASL_SSL",
                "sasl.enabled.mechanisms": MECHANISM,
                "sasl.mechanism.inter.broker.protocol": MECHANISM,
                f"listener.name.sasl_ssl.{MECHANISM.lower()}.sasl.jaas.config": jaas,
                "ssl.keystore.type": "PEM",
                "ssl.keystore.location": str(self.tls.keystore),
                "ssl.truststore.type": "PEM",
                "ssl.truststore.location": str(self.tls.ca),
                "ssl.client.auth": "none",
                "ssl.endpoint.identification.algorithm": "https",
            },
        )
        write_private(self.props, text)  # the inter-broker password is in it

    def client_config(self) -> dict[str, Any]:
        """librdkafka settings of the ``weir`` user (what Weir's settings produce)."""
        return {
            "bootstrap.servers": f"{HOST}:{self.port}",
            "security.protocol": "sasl_ssl",
            "sasl.mechanism": MECHANISM,
            "sasl.username": USER,
            "sasl.password": self.passwords["kafka_weir"],
            "ssl.ca.location": str(self.tls.ca),
        }

    def healthy(self, timeout: float = 2.0) -> bool:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({**self.client_config(), "log_level": 0})
        try:
            md = admin.list_topics(timeout=timeout)
        except Exception:
            return False
        return bool(md.brokers)


class SecureRedis:
    """``redis-server`` with ``tls-port`` only, in the foreground (its pid is the server's)."""

    def __init__(self, dir: Path, tls_port: int, tls: Tls, password: str) -> None:
        self.dir = dir
        self.port = tls_port
        self.tls = tls
        self.password = password
        self.conf = dir / "redis.conf"
        self.log = dir / "redis.log"

    def write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        base = stack.redis_config(0, self.dir, self.log)  # port 0: no plaintext listener
        write_private(
            self.conf,
            base
            + f"""
# TLS only (deploy/local/secure.py): clients check the server, log in as {USER}.
tls-port {self.port}
tls-cert-file {self.tls.cert}
tls-key-file {self.tls.key}
tls-ca-cert-file {self.tls.ca}
tls-auth-clients no
user default off
user {USER} on >{self.password} ~weir:* &* +@all
""",
        )

    def client(self, timeout: float = 5.0, **overrides: Any) -> Any:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        kw: dict[str, Any] = {
            "retry": Retry(NoBackoff(), 0),  # a refusal is an answer: do not ask again
            "host": HOST,
            "port": self.port,
            "ssl": True,
            "ssl_ca_certs": str(self.tls.ca),
            "username": USER,
            "password": self.password,
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
        }
        return redis.Redis(**{**kw, **overrides})

    def healthy(self) -> bool:
        import redis

        client = self.client(timeout=1.0)
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def launch(self) -> subprocess.Popen[bytes]:
        self.write_config()
        stack.rotate(self.log)
        return stack.launch_redis(self.conf)

    def wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        what = f"secure redis on {HOST}:{self.port} (TLS)"
        stack.wait_redis(proc, self.healthy, REDIS_READY_TIMEOUT, what, self.log)


# -- the stack --------------------------------------------------------------------------------


class SecureStack:
    """Kafka (SASL_SSL) and Redis (TLS) with their state in ``dir``.

    Ports, passwords and pids are kept in ``dir/secrets.json``; an ``up`` on the same
    ``dir`` reuses the passwords (the SCRAM users are in the formatted storage) and, when
    they are still free, the ports.
    """

    def __init__(self, dir: Path) -> None:
        self.dir = dir.resolve()
        self.state_file = self.dir / "secrets.json"
        self.tls = Tls(self.dir / "tls")
        state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        self.passwords: dict[str, str] = state.get("passwords") or {
            k: secrets.token_hex(16) for k in ("kafka_admin", "kafka_weir", "redis_weir")
        }
        ports = state.get("ports") or {}
        self.ports: dict[str, int] = {
            k: ports.get(k) or free_port() for k in ("kafka", "controller", "redis")
        }
        self.pids: dict[str, int] = state.get("pids", {})
        self._servers()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _servers(self) -> None:
        self.kafka = SecureKafka(
            self.ports["kafka"], self.ports["controller"], self.dir / "kafka", self.tls, self.passwords
        )
        self.redis = SecureRedis(
            self.dir / "redis", self.ports["redis"], self.tls, self.passwords["redis_weir"]
        )

    def save(self) -> None:
        write_private(
            self.state_file,
            json.dumps({"passwords": self.passwords, "ports": self.ports, "pids": self.pids}, indent=2)
            + "\n",
        )
        write_private(self.dir / "weir.env", "".join(f"{k}={v}\n" for k, v in self.env().items()))

    def running(self) -> dict[str, int]:
        """Pids (from the state file) that are still this stack's servers."""
        markers = {"kafka": str(self.kafka.props), "redis": str(self.redis.conf)}
        return {
            name: pid
            for name, pid in self.pids.items()
            if stack.alive(pid) and markers.get(name, "\0") in stack.cmdline(pid)
        }

    def up(self) -> float:
        """Start both servers and wait until they answer over TLS; the seconds it took."""
        if self.running():
            raise StackFailure(
                f"the secure stack in {self.dir} is already running (pids {self.running()}); "
                f"`secure.py down --dir {self.dir}` first"
            )
        t0 = time.monotonic()
        taken = {k for k, p in self.ports.items() if stack.port_in_use(p)}
        if taken:  # since the last run: take other free ones
            self.ports.update({k: free_port() for k in taken})
            self._servers()
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.tls.ensure()
        self.kafka.dir.mkdir(parents=True, exist_ok=True)
        try:
            self.procs["kafka"] = self.kafka.launch()
            self.pids["kafka"] = self.procs["kafka"].pid
            self.procs["redis"] = self.redis.launch()
            self.pids["redis"] = self.procs["redis"].pid
            self.save()
            self.redis.wait_ready(self.procs["redis"])
            self.kafka.wait_ready(self.procs["kafka"].pid)
        except BaseException:
            self.down()
            raise
        return time.monotonic() - t0

    def down(self) -> list[str]:
        """SIGTERM both (SIGKILL after a timeout); what was stopped."""
        stopped = []
        running = self.running()
        for pid in running.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for name, pid in running.items():
            proc = self.procs.get(name)

            def gone(p: int = pid, proc: subprocess.Popen[bytes] | None = proc) -> bool:
                return proc.poll() is not None if proc is not None else not stack.alive(p)

            if not stack.wait_until(gone, STOP_TIMEOUT):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                stack.wait_until(gone, 5.0)
            stopped.append(f"{name} (pid {pid})")
        self.pids = {}
        if self.state_file.exists():
            self.save()
        return stopped

    def env(self) -> dict[str, str]:
        """The ``WEIR_*`` variables that point Weir at this stack (passwords included)."""
        ca = str(self.tls.ca)
        return {
            "WEIR_KAFKA_BOOTSTRAP": f"{HOST}:{self.ports['kafka']}",
            "WEIR_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "WEIR_KAFKA_SASL_MECHANISM": MECHANISM,
            "WEIR_KAFKA_SASL_USERNAME": USER,
            "WEIR_KAFKA_SASL_PASSWORD": self.passwords["kafka_weir"],
            "WEIR_KAFKA_SSL_CAFILE": ca,
            "WEIR_REDIS_URL": f"rediss://{USER}@{HOST}:{self.ports['redis']}/0",
            "WEIR_REDIS_PASSWORD": self.passwords["redis_weir"],
            "WEIR_REDIS_SSL_CA_CERTS": ca,
        }


@contextlib.contextmanager
def secure_stack(dir: Path) -> Iterator[SecureStack]:
    """A started :class:`SecureStack` in ``dir``, stopped on exit."""
    st = SecureStack(dir)
    st.up()
    try:
        yield st
    finally:
        st.down()


# -- command line -----------------------------------------------------------------------------


def show_env(st: SecureStack) -> None:
    env_file = st.dir / "weir.env"
    secret = {"WEIR_KAFKA_SASL_PASSWORD", "WEIR_REDIS_PASSWORD"}
    print(f"# Weir's variables for this stack (passwords only in {env_file}, mode 0600):")
    for k, v in st.env().items():
        print(f"{k}={'<in ' + env_file.name + '>' if k in secret else v}")
    print(f"# load them all with: set -a; . {env_file}; set +a")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="secure.py", description="Kafka over SASL_SSL and Redis over TLS, on free local ports."
    )
    parser.add_argument("command", choices=["up", "down", "env"])
    parser.add_argument("--dir", type=Path, required=True, help="state dir (CA, passwords, data, logs)")
    args = parser.parse_args(argv)
    st = SecureStack(args.dir)
    try:
        if args.command == "up":
            took = st.up()
            print(
                f"secure stack up in {took:.1f}s: kafka SASL_SSL {HOST}:{st.ports['kafka']}, "
                f"redis TLS {HOST}:{st.ports['redis']} (state {st.dir})"
            )
            show_env(st)
        elif args.command == "env":
            show_env(st)
        else:
            stopped = st.down()
            print(f"stopped {', '.join(stopped)}" if stopped else "secure stack: nothing running")
    except StackFailure as exc:
        print(f"secure.py {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
