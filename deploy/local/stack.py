#!/usr/bin/env python3
"""The local stack: a real Kafka broker, Redis and Prometheus as plain processes.

Usage (with the project's virtualenv python)::

    python deploy/local/stack.py up       # start what is not running, wait until healthy
    python deploy/local/stack.py status   # one line per server; exit 1 if any is down
    python deploy/local/stack.py logs [kafka|redis|prometheus] [-n 50] [-f]
    python deploy/local/stack.py down     # stop all three, verify no process is left

No Docker: Kafka 3.9.2 (KRaft, one combined broker+controller) runs from jars fetched by
Maven into ``~/.cache/weir/kafka-3.9.2/libs`` (shared by every clone), Redis and
Prometheus are Debian's ``redis-server`` and ``prometheus``. Everything else (config,
data, pid files, logs) lives in ``<repo>/.weir/stack/``. Every server listens on
127.0.0.1 only. See docs/stack.md.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
STATE = REPO / ".weir" / "stack"
LOGS = STATE / "logs"
PIDS = STATE / "pids"

KAFKA_VERSION = "3.9.2"  # keep in step with deploy/local/kafka/pom.xml
# Shown on the first fetch so a newcomer can judge the wait; measured for 3.9.2.
KAFKA_LIBS_ABOUT = "57 jars, 48 MB; Maven also downloads ~20 MB of its own plugins and POMs"
KAFKA_PORT = 9092
KAFKA_CONTROLLER_PORT = 9093
REDIS_PORT = 6379
PROMETHEUS_PORT = 9090
HOST = "127.0.0.1"
DEFAULT_TARGET_PORTS = range(9300, 9306)

# Kafka on 2 cores needs up to ~60 s to reach RUNNING on a cold JVM; leave headroom.
KAFKA_READY_TIMEOUT = 90.0
REDIS_READY_TIMEOUT = 15.0
PROMETHEUS_READY_TIMEOUT = 30.0
# Kafka's controlled shutdown on one node takes a few seconds; after this, SIGKILL.
STOP_TIMEOUT = {"kafka": 30.0, "redis": 10.0, "prometheus": 15.0}

KAFKA_READY_LINE = "Transitioning from RECOVERY to RUNNING"

# Program -> Debian package that provides it.
INSTALL = {
    "java": "openjdk-17-jre-headless",
    "mvn": "maven",
    "redis-server": "redis-server",
    "prometheus": "prometheus",
    "promtool": "prometheus",
}


class StackFailure(Exception):
    """Raised for every expected failure; main() prints the message and exits 1."""


def say(msg: str) -> None:
    print(msg, flush=True)


# -- processes and ports ----------------------------------------------------------------


def cmdline(pid: int) -> str:
    """The command line of ``pid`` ('' if it is gone or not ours to read)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not alive for our purposes.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def pids_with(marker: str) -> list[int]:
    """Pids whose command line contains ``marker`` (our state dir paths are unique)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            pid = int(entry.name)
            if marker in cmdline(pid) and alive(pid):
                found.append(pid)
    return sorted(found)


def port_in_use(port: int) -> bool:
    # SO_REUSEADDR: a socket in TIME_WAIT (left by a server we just stopped) does not
    # count, only a listener does.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return True
    return False


def port_owner(port: int) -> tuple[int, str] | None:
    """(pid, command line) of the process listening on ``port``, if this user can see it."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    if not inodes:
        return None
    targets = {f"socket:[{i}]" for i in inodes}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in targets:
                    return int(entry.name), cmdline(int(entry.name))
        except OSError:
            continue
    return None


def port_taken_message(port: int, what: str) -> str:
    owner = port_owner(port)
    if owner is None:
        who = f"a process this user cannot see (find it with `ss -ltnp 'sport = :{port}'`, as root)"
        fix = "stop it"
    else:
        pid, cmd = owner
        who = f"pid {pid} ({cmd or '?'})"
        fix = f"stop it (`kill {pid}`)"
        other = re.search(r"(/[^\s=:]*)/\.weir/stack/", cmd)
        if other and Path(other.group(1) or "/") != REPO:
            who += f", the local stack of another clone ({other.group(1)})"
            fix = f"stop it (`python {other.group(1)}/deploy/local/stack.py down`)"
        elif "prometheus" in cmd:
            who += ", probably the prometheus service Debian's package starts"
            fix = f"stop it (`systemctl disable --now prometheus`, or `kill {pid}` where there is no systemd)"
        elif "redis-server" in cmd:
            fix = (
                "stop it (`systemctl disable --now redis-server`, or `redis-cli -p "
                f"{port} shutdown nosave`), or point Weir at it with WEIR_REDIS_URL "
                "and do not start the local stack"
            )
        elif "kafka" in cmd.lower():
            fix = (
                f"stop it (`kill {pid}`), or point Weir at it with WEIR_KAFKA_BOOTSTRAP "
                "and do not start the local stack"
            )
    return (
        f"{what}: port {HOST}:{port} is already taken by {who}, not by this stack "
        f"(state {STATE}); {fix}, then run `stack.py up` again"
    )


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(lines[-n:]) or f"(empty log {path})"


def rotate(log: Path) -> None:
    """Keep the previous run's log as ``<log>.prev`` so a start reads only its own lines."""
    if log.exists():
        log.replace(log.with_name(log.name + ".prev"))


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def need(*programs: str) -> None:
    missing = [p for p in programs if find_program(p) is None]
    if missing:
        packages = " ".join(sorted({INSTALL[p] for p in missing}))
        raise StackFailure(
            f"missing program(s): {', '.join(missing)}; install with "
            f"`sudo apt-get install -y {packages}` (or run `sudo deploy/local/install-debian.sh`)"
        )


def find_program(name: str) -> str | None:
    if name == "java" and os.environ.get("JAVA_HOME"):
        candidate = Path(os.environ["JAVA_HOME"]) / "bin" / "java"
        if candidate.exists():
            return str(candidate)
    return shutil.which(name)


def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start a long-running server detached from us (own session, output to ``log``)."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the terminal or pytest must not reach it
            close_fds=True,
        )


# -- servers ---------------------------------------------------------------------------------


@dataclass
class Server:
    """One server of the stack. Subclasses know how to start it and check its health."""

    name: str
    address: str
    ports: tuple[int, ...]
    log: Path
    #: A substring of the server's command line that only our instance has.
    marker: str
    pidfile: Path = field(init=False)

    def __post_init__(self) -> None:
        self.pidfile = PIDS / f"{self.name}.pid"

    # Subclass hooks
    def healthy(self, timeout: float = 2.0) -> bool:
        raise NotImplementedError

    def start(self) -> int:
        raise NotImplementedError

    def wait_ready(self, pid: int) -> None:
        raise NotImplementedError

    def prerequisites(self) -> None:
        """Raise StackFailure naming the install command for what is missing."""

    def on_reuse(self) -> None:
        """Called when ``up`` finds the server already running and healthy."""

    # Shared logic
    def pids(self) -> list[int]:
        pids = set(pids_with(self.marker))
        pid = read_pid(self.pidfile)
        if pid is not None and alive(pid) and self.marker in cmdline(pid):
            pids.add(pid)
        return sorted(pids)

    def up(self) -> bool:
        """Start the server unless it runs; True if this call started it."""
        pids = self.pids()
        if pids:
            if not self.healthy():
                say(f"{self.name}: running (pid {pids[0]}) but not healthy yet; waiting")
                self.wait_ready(pids[0])
            self.pidfile.write_text(f"{pids[0]}\n")
            self.on_reuse()
            say(f"{self.name}: already running, reused (pid {pids[0]}, {self.address})")
            return False
        if self.pidfile.exists():
            say(f"{self.name}: removing stale pid file {self.pidfile}")
            self.pidfile.unlink()
        for port in self.ports:
            if port_in_use(port):
                raise StackFailure(port_taken_message(port, self.name))
        self.prerequisites()
        t0 = time.monotonic()
        pid = self.start()
        self.pidfile.write_text(f"{pid}\n")
        self.wait_ready(pid)
        say(f"{self.name}: ready in {time.monotonic() - t0:.1f}s (pid {pid}, {self.address})")
        return True

    def fail_start(self, why: str, pid: int | None = None) -> StackFailure:
        extra = ""
        if pid is not None and alive(pid):
            extra = f" (still running as pid {pid}; `stack.py down` stops it)"
        return StackFailure(
            f"{self.name} {why}{extra}\n--- last lines of {self.log} ---\n{tail(self.log)}\n"
            f"--- full log: {self.log}"
        )

    def wait_healthy(self, pid: int, timeout: float, what: str) -> None:
        def check() -> bool:
            if not alive(pid):
                raise self.fail_start(f"exited while starting (pid {pid})")
            return self.healthy()

        if not wait_until(check, timeout):
            raise self.fail_start(f"not {what} after {timeout:.0f}s", pid)


def pom_artifacts(pom: Path) -> list[str]:
    """``group:artifact:version`` of each dependency listed in ``pom``, ``${properties}`` resolved."""
    import xml.etree.ElementTree as ET

    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    root = ET.parse(pom).getroot()
    props = {el.tag.rpartition("}")[2]: el.text or "" for el in root.iterfind("m:properties/*", ns)}
    out = []
    for dep in root.iterfind("m:dependencies/m:dependency", ns):
        gav = [dep.findtext(f"m:{k}", "", ns) for k in ("groupId", "artifactId", "version")]
        gav[2] = re.sub(r"\$\{([^}]+)\}", lambda m: props.get(m[1], m[0]), gav[2])
        out.append(":".join(gav))
    return out


# Maven's batch-mode transfer log: "[INFO] Downloaded from central: <url> (4.7 MB at 3.3 MB/s)".
MAVEN_DOWNLOADED = re.compile(
    r"Downloaded from (?P<repo>[^:\s]+): (?P<url>\S+) \((?P<size>[\d.]+) (?P<unit>B|kB|MB|GB) "
)
MAVEN_UNITS = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}  # Maven prints decimal units
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class FetchProgress:
    """What Maven has downloaded so far, counted from its ``Downloaded from`` lines.

    Examples:
        >>> p = FetchProgress()
        >>> p.feed("[INFO] Downloaded from central: https://repo.example/maven2/"
        ...        "org/apache/kafka/kafka_2.13/3.9.2/kafka_2.13-3.9.2.jar (4.7 MB at 3.3 MB/s)")
        True
        >>> p.line(12.3)
        'kafka: 12s: Maven downloaded 1 files, 4.7 MB so far from repo.example (latest: kafka_2.13-3.9.2.jar)'
    """

    files: int = 0
    nbytes: float = 0.0
    latest: str = ""
    source: str = ""

    def feed(self, line: str) -> bool:
        """Count ``line`` if it reports a finished download; True if it did."""
        found = MAVEN_DOWNLOADED.search(ANSI_ESCAPE.sub("", line))
        if not found:
            return False
        url = found["url"]
        self.files += 1
        self.nbytes += float(found["size"]) * MAVEN_UNITS[found["unit"]]
        self.latest = url.rpartition("/")[2]
        if not self.source:
            self.source = url.split("/")[2] if "://" in url else found["repo"]
        return True

    def line(self, elapsed: float) -> str:
        if not self.files:
            return f"kafka: {elapsed:.0f}s: Maven is starting and resolving; nothing downloaded yet"
        return (
            f"kafka: {elapsed:.0f}s: Maven downloaded {self.files} files, "
            f"{self.nbytes / 1e6:.1f} MB so far from {self.source} (latest: {self.latest})"
        )


class Kafka(Server):
    """The stack's broker. The fault suite (tests/integration/faults.py) runs a second one
    of the same configuration on its own ports and ``state`` dir (logs in it too)."""

    #: Seconds between two progress lines while Maven fetches the jars.
    fetch_progress_every = 5.0

    def __init__(
        self,
        port: int = KAFKA_PORT,
        controller_port: int = KAFKA_CONTROLLER_PORT,
        state: Path = STATE / "kafka",
        logs: Path = LOGS,
        *,
        name: str = "kafka",
        node_id: int = 1,
        voters: str | None = None,
        replication: int = 1,
    ) -> None:
        self.dir = state
        self.props = self.dir / "server.properties"
        self.port = port
        self.controller_port = controller_port
        self.logs = logs
        # deploy/local/cluster.py runs three of these as one KRaft quorum: ``voters`` is
        # Kafka's ``id@host:port,...`` and ``replication`` the internal topics' factor.
        self.node_id = node_id
        self.voters = voters or f"{node_id}@{HOST}:{controller_port}"
        self.replication = replication
        super().__init__(
            name=name,
            address=f"{HOST}:{port} (controller {HOST}:{controller_port})",
            ports=(port, controller_port),
            log=logs / "kafka.log",
            marker=str(self.props),
        )

    @staticmethod
    def libs() -> Path:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return cache / "weir" / f"kafka-{KAFKA_VERSION}" / "libs"

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            from confluent_kafka.admin import AdminClient
        except ImportError as exc:  # pragma: no cover - the venv has it
            raise StackFailure(
                "confluent-kafka is not importable: run stack.py with the project's "
                "virtualenv python (`pip install -e '.[dev]'`)"
            ) from exc
        # log_level 0: librdkafka would print a connection-refused line per retry.
        admin = AdminClient({"bootstrap.servers": f"{HOST}:{self.port}", "log_level": 0})
        try:
            md = admin.list_topics(timeout=timeout)
        except Exception:
            return False
        return bool(md.brokers)

    def prerequisites(self) -> None:
        need("java")
        if not (self.libs() / ".complete").exists():
            need("mvn")

    def fetch_libs(self) -> Path:
        libs = self.libs()
        if (libs / ".complete").exists():
            return libs
        tmp = libs.with_name(f"libs.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        pom = HERE / "kafka" / "pom.xml"
        say(f"kafka: first run on this machine: fetching the Kafka {KAFKA_VERSION} jars with Maven")
        say(f"  what:  {', '.join(pom_artifacts(pom))} and their runtime dependencies")
        say(f"         (about {KAFKA_LIBS_ABOUT})")
        say("  from:  Maven Central (or the mirror in ~/.m2/settings.xml), cached in ~/.m2/repository")
        say(f"  into:  {libs} (once per machine, shared by every clone)")
        say(f"  takes: a minute or more on a slow link; progress every {self.fetch_progress_every:g}s")
        t0 = time.monotonic()
        argv = [
            find_program("mvn") or "mvn",
            "-B",  # batch mode: one "Downloaded from" line per file, no progress bars
            "-Dstyle.color=never",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={tmp}",
        ]
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
        progress = FetchProgress()
        output: list[str] = []

        def read() -> None:
            assert proc.stdout is not None
            for out_line in proc.stdout:
                if not progress.feed(out_line) and not out_line.startswith("[INFO] Downloading"):
                    output.append(out_line)
                    del output[:-100]

        reader = threading.Thread(target=read, name="mvn-output", daemon=True)
        reader.start()
        try:
            while True:
                try:
                    rc = proc.wait(timeout=self.fetch_progress_every)
                    break
                except subprocess.TimeoutExpired:
                    say(progress.line(time.monotonic() - t0))
        finally:
            if proc.poll() is None:  # interrupted: leave no Maven and no half folder behind
                proc.kill()
                proc.wait()
                shutil.rmtree(tmp, ignore_errors=True)
        reader.join(timeout=10)
        jar = tmp / f"kafka_2.13-{KAFKA_VERSION}.jar"
        if rc != 0 or not jar.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            raise StackFailure(
                f"kafka: Maven could not fetch the broker jars (exit {rc}); "
                "it needs Maven Central (or a mirror in ~/.m2/settings.xml).\n"
                f"command: {' '.join(argv)}\n{''.join(output)[-3000:]}"
            )
        (tmp / ".complete").write_text(f"kafka {KAFKA_VERSION}\n")
        if libs.exists():  # a half-written folder from an older, interrupted layout
            shutil.rmtree(libs)
        tmp.rename(libs)
        jars = list(libs.glob("*.jar"))
        size = sum(j.stat().st_size for j in jars) / 1e6
        say(
            f"kafka: {len(jars)} jars ({size:.1f} MB) in {libs}, fetched in "
            f"{time.monotonic() - t0:.1f}s (Maven downloaded {progress.files} files, "
            f"{progress.nbytes / 1e6:.1f} MB)"
        )
        return libs

    def cluster_id(self) -> str:
        path = self.dir / "cluster-id"
        if path.exists():
            return path.read_text().strip()
        while True:
            # Kafka's format: 16 random bytes, url-safe base64 without padding (22 chars).
            cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            if not cid.startswith("-"):  # would read as a command-line option
                break
        path.write_text(cid + "\n")
        return cid

    def write_config(self) -> None:
        data = self.dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        min_isr = max(1, self.replication - 1)
        self.props.write_text(
            f"""# Generated by deploy/local/stack.py; edits are overwritten on `up`.
process.roles=broker,controller
node.id={self.node_id}
controller.quorum.voters={self.voters}
listeners=PLAINTEXT://{HOST}:{self.port},CONTROLLER://{HOST}:{self.controller_port}
advertised.listeners=PLAINTEXT://{HOST}:{self.port}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs={data}

# One node: every replication factor and min ISR at 1 (a cluster: 3 and 2).
default.replication.factor={self.replication}
min.insync.replicas={min_isr}
offsets.topic.replication.factor={self.replication}
transaction.state.log.replication.factor={self.replication}
transaction.state.log.min.isr={min_isr}
# The default of 50 partitions makes the first consumer-group join slow.
offsets.topic.num.partitions=1
transaction.state.log.num.partitions=1
group.initial.rebalance.delay.ms=0

# Topics are created on purpose (streams.admin.ensure_topics; Faust declares its own),
# so a misspelt topic name fails instead of silently creating a new topic.
auto.create.topics.enable=false
delete.topic.enable=true
num.partitions=1

# Small machine, local data: few threads, one day of retention.
num.network.threads=2
num.io.threads=4
log.retention.hours=24
log.segment.bytes=67108864
"""
        )
        (self.dir / "log4j.properties").write_text(
            f"""# Generated by deploy/local/stack.py: the broker logs to {self.log}.
log4j.rootLogger=INFO, file
log4j.appender.file=org.apache.log4j.RollingFileAppender
log4j.appender.file.File={self.log}
log4j.appender.file.MaxFileSize=50MB
log4j.appender.file.MaxBackupIndex=2
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
# Per-request and per-partition chatter.
log4j.logger.kafka.request.logger=WARN
log4j.logger.state.change.logger=WARN
log4j.logger.kafka.log.LogCleaner=WARN
log4j.logger.org.apache.kafka.storage.internals.log=WARN
"""
        )
        (self.dir / "tools-log4j.properties").write_text(
            "log4j.rootLogger=WARN, stderr\n"
            "log4j.appender.stderr=org.apache.log4j.ConsoleAppender\n"
            "log4j.appender.stderr.Target=System.err\n"
            "log4j.appender.stderr.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.stderr.layout.ConversionPattern=[%d] %p %m (%c)%n\n"
        )

    def format_args(self) -> list[str]:
        """Extra arguments of the storage format (deploy/local/secure.py adds SCRAM users)."""
        return []

    def java(self, libs: Path, log4j: str, *args: str, heap: bool = False) -> list[str]:
        argv = [find_program("java") or "java"]
        if heap:
            argv += ["-Xms512m", "-Xmx512m"]
        argv += [
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.dir / log4j}",
            f"-Dkafka.logs.dir={self.logs}",
            "-cp",
            f"{libs}/*",
            *args,
        ]
        return argv

    def start(self) -> int:
        return self.launch().pid

    def launch(self) -> subprocess.Popen[bytes]:
        """Fetch the jars (first time), write the config, format the storage (first time)
        and start the broker; the caller waits with :meth:`wait_ready`."""
        libs = self.fetch_libs()
        self.write_config()
        if not (self.dir / "data" / "meta.properties").exists():
            argv = self.java(
                libs,
                "tools-log4j.properties",
                "kafka.tools.StorageTool",
                "format",
                "-t",
                self.cluster_id(),
                "-c",
                str(self.props),
                "--ignore-formatted",
                *self.format_args(),
            )
            res = subprocess.run(argv, capture_output=True, text=True)
            if res.returncode != 0:
                raise StackFailure(
                    f"kafka: formatting the storage in {self.dir / 'data'} failed "
                    f"(exit {res.returncode}):\n{res.stdout}{res.stderr}\n"
                    f"if the data dir is from another cluster, `stack.py down` and remove "
                    f"{self.dir} to start afresh"
                )
        rotate(self.log)
        stdout = self.logs / "kafka.stdout.log"
        rotate(stdout)
        # JVM-level output (crash reports, OutOfMemoryError) lands in kafka.stdout.log;
        # the broker itself logs to kafka.log through log4j.
        return spawn(self.java(libs, "log4j.properties", "kafka.Kafka", str(self.props), heap=True), stdout)

    def fail_start(self, why: str, pid: int | None = None) -> StackFailure:
        err = super().fail_start(why, pid)
        jvm = self.logs / "kafka.stdout.log"
        if jvm.exists() and jvm.stat().st_size:
            return StackFailure(f"{err}\n--- JVM output {jvm} ---\n{tail(jvm, 20)}")
        return err

    def wait_ready(self, pid: int) -> None:
        def log_says_running() -> bool:
            if not alive(pid):
                raise self.fail_start(f"exited while starting (pid {pid})")
            try:
                return KAFKA_READY_LINE in self.log.read_text(errors="replace")
            except OSError:
                return False

        t0 = time.monotonic()
        if self.healthy(timeout=1.0):
            return
        if not wait_until(log_says_running, KAFKA_READY_TIMEOUT, interval=0.5):
            raise self.fail_start(f"did not log {KAFKA_READY_LINE!r} within {KAFKA_READY_TIMEOUT:.0f}s", pid)
        left = max(5.0, KAFKA_READY_TIMEOUT - (time.monotonic() - t0))
        self.wait_healthy(pid, left, "answering metadata requests")


def redis_config(port: int, data_dir: Path, log: Path, pidfile: Path | None = None) -> str:
    """The local Redis's configuration: durable, because the model registry, snapshots and
    the monitor's checkpoint live there (features could be rebuilt from Kafka; they could
    not). With ``pidfile`` the server daemonizes; without, it stays in the foreground."""
    daemon = f"daemonize yes\npidfile {pidfile}" if pidfile is not None else "daemonize no"
    # Redis rewrites its process title; the template keeps the config path in it so
    # that `down` recognises our instance even without the pid file.
    return f"""# Generated by deploy/local/stack.py; edits are overwritten on `up`.
bind {HOST}
port {port}
protected-mode yes
{daemon}
logfile {log}
dir {data_dir}
proc-title-template "{{title}} {{listen-addr}} {{server-mode}} {{config-file}}"
# Durable: every write is in the append-only file within a second (docs/production.md).
appendonly yes
appendfsync everysec
appenddirname "appendonlydir"
aof-use-rdb-preamble yes
# The AOF is the persistence; no extra RDB snapshots on a timer.
save ""
# Never evict: the registry, snapshots and checkpoints must not vanish to make room.
maxmemory-policy noeviction
"""


def launch_redis(conf: Path) -> subprocess.Popen[bytes]:
    """``redis-server conf`` in the foreground of a session of its own (its pid is the
    server's; a Ctrl-C in a terminal or pytest does not reach it), for the private servers
    of ``secure.py`` and the tests (the stack's own daemonizes)."""
    need("redis-server")
    return subprocess.Popen(
        [find_program("redis-server") or "redis-server", str(conf)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_redis(
    proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float, what: str, log: Path
) -> None:
    """Wait until ``ready()`` (a PING, as the server's clients log in); StackFailure naming
    ``what`` with the log's last lines if the server exits first or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            state = (
                f"exited {proc.returncode}" if proc.poll() is not None else f"not ready after {timeout:.0f}s"
            )
            raise StackFailure(f"{what} did not answer a PING ({state}):\n{tail(log)}")
        time.sleep(0.1)


class Redis(Server):
    """The stack's ``redis-server`` (daemonized, durable); ``cluster.py`` runs six of these
    on other ports, names and directories, with a cluster-mode :meth:`config`."""

    def __init__(
        self,
        port: int = REDIS_PORT,
        *,
        name: str = "redis",
        dir: Path = STATE / "redis",
        log: Path = LOGS / "redis.log",
        address: str | None = None,
        ports: tuple[int, ...] | None = None,
    ) -> None:
        self.port = port
        self.dir = dir
        self.conf = self.dir / "redis.conf"
        super().__init__(
            name=name,
            address=address or f"redis://{HOST}:{port}/0",
            ports=ports or (port,),
            log=log,
            marker=str(self.conf),
        )

    def config(self) -> str:
        return redis_config(self.port, self.dir, self.log, self.pidfile)

    def healthy(self, timeout: float = 2.0) -> bool:
        import redis

        client = redis.Redis(host=HOST, port=self.port, socket_timeout=timeout)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def prerequisites(self) -> None:
        need("redis-server")

    def on_reuse(self) -> None:
        import redis

        client = redis.Redis(host=HOST, port=self.port, socket_timeout=5)
        try:
            aof = client.config_get("appendonly").get("appendonly")
        except redis.RedisError:
            return
        finally:
            client.close()
        if aof != "yes":
            say(
                "redis: WARNING: this Redis runs without appendonly (started by an older "
                "stack.py?); the registry and snapshots would not survive a restart: "
                "`stack.py down redis && stack.py up redis` restarts it durable"
            )

    def start(self) -> int:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.config())
        rotate(self.log)
        self.pidfile.unlink(missing_ok=True)
        res = subprocess.run(
            [find_program("redis-server") or "redis-server", str(self.conf)],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            raise self.fail_start(f"failed to start (exit {res.returncode}): {res.stderr}")
        # daemonize: the server forks and writes its pid file itself.
        if not wait_until(lambda: read_pid(self.pidfile) is not None, REDIS_READY_TIMEOUT):
            raise self.fail_start(f"wrote no pid file {self.pidfile}")
        return read_pid(self.pidfile) or 0

    def wait_ready(self, pid: int) -> None:
        self.wait_healthy(pid, REDIS_READY_TIMEOUT, "answering PING")


class Prometheus(Server):
    def __init__(self) -> None:
        self.dir = STATE / "prometheus"
        self.config = self.dir / "prometheus.yml"
        self.targets = self.dir / "targets"
        super().__init__(
            name="prometheus",
            address=f"http://{HOST}:{PROMETHEUS_PORT}",
            ports=(PROMETHEUS_PORT,),
            log=LOGS / "prometheus.log",
            marker=str(self.config),
        )

    def http(self, path: str, method: str = "GET", timeout: float = 2.0) -> tuple[int, str]:
        req = urllib.request.Request(f"http://{HOST}:{PROMETHEUS_PORT}{path}", method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")
        except (OSError, urllib.error.URLError):
            return 0, ""

    def healthy(self, timeout: float = 2.0) -> bool:
        return self.http("/-/ready", timeout=timeout)[0] == 200

    def prerequisites(self) -> None:
        need("prometheus", "promtool")

    def render(self) -> bool:
        """Write the config from the template; True if it changed."""
        self.targets.mkdir(parents=True, exist_ok=True)
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        default = self.targets / "default.json"
        if not default.exists():
            entries = [{"targets": [f"{HOST}:{p}" for p in DEFAULT_TARGET_PORTS]}]
            default.write_text(json.dumps(entries, indent=2) + "\n")
        text = (HERE / "prometheus.yml").read_text()
        text = text.replace("${STATE}", str(STATE)).replace("${REPO}", str(REPO))
        text = "# Generated by deploy/local/stack.py from deploy/local/prometheus.yml.\n" + text
        old = self.config.read_text() if self.config.exists() else None
        self.config.write_text(text)
        self.check_config()
        return old != text

    def check_config(self) -> None:
        promtool = find_program("promtool")
        if promtool is None:
            return
        res = subprocess.run([promtool, "check", "config", str(self.config)], capture_output=True, text=True)
        if res.returncode != 0:
            raise StackFailure(
                f"prometheus: `promtool check config {self.config}` failed; a rule file in "
                f"{REPO / 'deploy/prometheus/rules'} or deploy/local/prometheus.yml is "
                f"invalid:\n{res.stdout}{res.stderr}"
            )

    def on_reuse(self) -> None:
        # Always reload: rule files in deploy/prometheus/rules/ are read only on (re)load,
        # and a reload costs milliseconds. promtool has checked the config first.
        changed = self.render()
        status, body = self.http("/-/reload", method="POST", timeout=10.0)
        if status != 200:
            raise StackFailure(f"prometheus: config reload failed ({status}): {body}")
        say(f"prometheus: {'configuration changed, ' if changed else ''}reloaded config and rules")

    def start(self) -> int:
        self.render()
        rotate(self.log)
        argv = [
            find_program("prometheus") or "prometheus",
            f"--config.file={self.config}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            "--storage.tsdb.retention.time=2d",
            f"--web.listen-address={HOST}:{PROMETHEUS_PORT}",
            "--web.enable-lifecycle",
        ]
        return spawn(argv, self.log).pid

    def wait_ready(self, pid: int) -> None:
        self.wait_healthy(pid, PROMETHEUS_READY_TIMEOUT, "ready (/-/ready)")


def servers() -> list[Server]:
    return [Kafka(), Redis(), Prometheus()]


# -- commands --------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(lockfile: Path = STATE / "stack.lock") -> Iterator[None]:
    """Serialise `up` and `down` (two test sessions starting the stack at once)."""
    lockfile.parent.mkdir(parents=True, exist_ok=True)
    with open(lockfile, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cmd_up(args: argparse.Namespace) -> int:
    picked = chosen(args.server)
    for d in (LOGS, PIDS):
        d.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    started = []
    with locked():
        for server in picked:
            if server.up():
                started.append(server.name)
    say(f"stack up in {time.monotonic() - t0:.1f}s; logs in {LOGS}")
    if args.json:
        # Last line, for tests/integration/conftest.py: stop only what it started.
        say(json.dumps({"started": started, "reused": [s.name for s in picked if s.name not in started]}))
    return 0


def stop(server: Server) -> list[int]:
    pids = server.pids()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    return pids


def stop_all(picked: list[Server], timeout: Callable[[Server], float]) -> list[str]:
    """SIGTERM every server first (they shut down in parallel), then wait for each pid up to
    ``timeout(server)`` s and SIGKILL it after that. What is still running, sorted ([] when
    all stopped)."""
    stopping = {s.name: (s, stop(s)) for s in picked}
    left: list[str] = []
    for name, (server, pids) in stopping.items():
        if not pids:
            say(f"{name}: not running")
        limit = timeout(server)
        for pid in pids:
            t0 = time.monotonic()

            def gone(p: int = pid) -> bool:
                return not alive(p)

            if not wait_until(gone, limit):
                say(f"{name}: pid {pid} ignored SIGTERM for {limit:.0f}s, SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                wait_until(gone, 5.0)
            if alive(pid):
                left.append(f"{name} pid {pid}")
            else:
                say(f"{name}: stopped pid {pid} in {time.monotonic() - t0:.1f}s")
        server.pidfile.unlink(missing_ok=True)
        left += [f"{name} pid {p}" for p in server.pids()]
    return sorted(set(left))


def chosen(names: list[str]) -> list[Server]:
    """The servers named (all when none is), in start order."""
    known = [s.name for s in servers()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise StackFailure(f"unknown server(s) {unknown}; choose from {known}")
    return [s for s in servers() if not names or s.name in names]


def cmd_down(args: argparse.Namespace) -> int:
    picked = chosen(args.server)
    if not STATE.exists():
        say("stack: nothing to stop")
        return 0
    with locked():
        left = stop_all(picked, lambda server: STOP_TIMEOUT[server.name])
    if left:
        say("stack: still running after down: " + ", ".join(left))
        return 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    down = 0
    for server in chosen(args.server):
        pids = server.pids()
        ok = server.healthy()
        pid = str(pids[0]) if pids else "-"
        state = "healthy" if ok else "down"
        note = ""
        if ok and not pids:
            owner = next((port_owner(p) for p in server.ports), None)
            note = f"  (not started by this stack: {owner[1] if owner else 'unknown process'})"
        elif pids and not ok:
            note = "  (process running but not answering; see its log)"
        down += not ok
        say(f"{server.name:<11} {state:<8} pid {pid:<8} {server.address:<45} {server.log}{note}")
    return 1 if down else 0


def cmd_logs(args: argparse.Namespace) -> int:
    picked = chosen(args.server)
    if args.follow:
        paths = [str(s.log) for s in picked]
        os.execvp("tail", ["tail", "-n", str(args.lines), "-F", *paths])
    for server in picked:
        say(f"==> {server.log} <==")
        say(tail(server.log, args.lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stack.py", description="Weir's local Kafka, Redis and Prometheus (no Docker)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "up": (cmd_up, "start what is not running and wait until healthy"),
        "down": (cmd_down, "stop the servers, SIGKILL after a timeout"),
        "status": (cmd_status, "health of each server; exit 1 if any is down"),
        "logs": (cmd_logs, "print (or follow) the servers' logs"),
    }
    for name, (func, text) in commands.items():
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("server", nargs="*", help="kafka, redis and/or prometheus (default: all)")
        cmd.set_defaults(func=func)
        if name == "up":
            cmd.add_argument("--json", action="store_true", help="end with a JSON line: started/reused")
        if name == "logs":
            cmd.add_argument("-n", "--lines", type=int, default=50)
            cmd.add_argument("-f", "--follow", action="store_true")
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except StackFailure as exc:
        print(f"stack.py {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"stack.py {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
