"""The first-run fetch of the Kafka jars in deploy/local/stack.py says what it fetches and how far
it has got (issue #10). Nothing is downloaded: a fake ``mvn`` on PATH prints Maven's batch-mode
transfer lines and writes the jars.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
STACK_PY = REPO / "deploy" / "local" / "stack.py"


def load_stack() -> ModuleType:
    spec = importlib.util.spec_from_file_location("weir_local_stack", STACK_PY)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


stack = load_stack()

# As Maven 3.8.7 printed them on this machine (with its colour reset in front of the first).
REAL_LINES = [
    "\x1b[0m\x1b[0m[INFO] Scanning for projects...\n",
    "[INFO] Downloading from central: https://repo.maven.apache.org/maven2/org/apache/kafka/"
    "kafka_2.13/3.9.2/kafka_2.13-3.9.2.pom\n",
    "[INFO] Downloaded from central: https://repo.maven.apache.org/maven2/org/apache/kafka/"
    "kafka_2.13/3.9.2/kafka_2.13-3.9.2.pom (27 kB at 389 kB/s)\n",
    "[INFO] Downloaded from central: https://repo.maven.apache.org/maven2/org/apache/kafka/"
    "kafka_2.13/3.9.2/kafka_2.13-3.9.2.jar (4.7 MB at 3.3 MB/s)\n",
    "[INFO] Downloaded from central: https://repo.maven.apache.org/maven2/org/sonatype/"
    "oss/oss-parent/7/oss-parent-7.pom (512 B at 20 kB/s)\n",
    "[INFO] BUILD SUCCESS\n",
]


def test_progress_counts_only_finished_downloads() -> None:
    progress = stack.FetchProgress()
    counted = [progress.feed(line) for line in REAL_LINES]
    assert counted == [False, False, True, True, True, False]
    assert progress.files == 3
    assert progress.nbytes == pytest.approx(27e3 + 4.7e6 + 512)
    assert progress.latest == "oss-parent-7.pom"
    assert progress.source == "repo.maven.apache.org"
    assert progress.line(31.6) == (
        "kafka: 32s: Maven downloaded 3 files, 4.7 MB so far from repo.maven.apache.org"
        " (latest: oss-parent-7.pom)"
    )


def test_progress_before_the_first_download_says_maven_is_working() -> None:
    assert stack.FetchProgress().line(4.0) == (
        "kafka: 4s: Maven is starting and resolving; nothing downloaded yet"
    )


def test_the_pom_lists_kafka_at_the_version_stack_py_runs() -> None:
    """stack.py names the jar by KAFKA_VERSION; the pom must fetch that version."""
    artifacts = stack.pom_artifacts(STACK_PY.parent / "kafka" / "pom.xml")
    assert artifacts == [
        f"org.apache.kafka:kafka_2.13:{stack.KAFKA_VERSION}",
        "org.slf4j:slf4j-reload4j:1.7.36",
    ]


FAKE_MVN = r"""#!/bin/sh
echo "$@" >"$FAKE_MVN_ARGV"
for a in "$@"; do
    case "$a" in -DoutputDirectory=*) out=${a#-DoutputDirectory=} ;; esac
done
echo "[INFO] Scanning for projects..."
echo "[INFO] Downloading from mirror: https://mirror.example/m2/org/a/1/a-1.jar"
echo "[INFO] Downloaded from mirror: https://mirror.example/m2/org/a/1/a-1.jar (900 kB at 1 MB/s)"
sleep 1.5
if [ -n "${FAKE_MVN_FAIL:-}" ]; then
    echo "[ERROR] Failed to execute goal: Could not transfer artifact org.apache.kafka:kafka_2.13"
    exit 1
fi
j="kafka_2.13-$FAKE_KAFKA_VERSION.jar"
echo "[INFO] Downloaded from mirror: https://mirror.example/m2/org/k/$j (4.7 MB at 3 MB/s)"
mkdir -p "$out"
printf 'jar' >"$out/$j"
printf 'jar' >"$out/a-1.jar"
echo "[INFO] BUILD SUCCESS"
"""


@pytest.fixture
def fake_mvn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    mvn = bin_dir / "mvn"
    mvn.write_text(FAKE_MVN)
    mvn.chmod(0o755)
    argv_file = tmp_path / "mvn-argv"
    monkeypatch.setenv("PATH", f"{bin_dir}:{sys.exec_prefix}/bin:/usr/bin:/bin")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("FAKE_MVN_ARGV", str(argv_file))
    monkeypatch.setenv("FAKE_KAFKA_VERSION", stack.KAFKA_VERSION)
    monkeypatch.setattr(stack.Kafka, "fetch_progress_every", 0.2)
    return argv_file


def test_fetch_says_what_where_and_how_far(fake_mvn: Path, capsys: pytest.CaptureFixture[str]) -> None:
    libs = stack.Kafka().fetch_libs()
    out = capsys.readouterr().out
    assert libs == stack.Kafka.libs()
    assert (libs / ".complete").exists()
    assert f"org.apache.kafka:kafka_2.13:{stack.KAFKA_VERSION}" in out
    assert f"into:  {libs}" in out
    # At least one line while Maven runs, counting what it has downloaded.
    assert "Maven downloaded 1 files, 0.9 MB so far from mirror.example (latest: a-1.jar)" in out
    assert f"kafka: 2 jars (0.0 MB) in {libs}" in out
    assert "(Maven downloaded 2 files, 5.6 MB)" in out
    argv = fake_mvn.read_text().split()
    assert "-B" in argv
    assert "-q" not in argv, "-q hides the transfer lines the progress is counted from"


def test_a_failed_fetch_shows_maven_error_and_leaves_no_half_folder(
    fake_mvn: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_MVN_FAIL", "1")
    with pytest.raises(stack.StackFailure, match=r"(?s)exit 1\).*\[ERROR\] Failed to execute goal"):
        stack.Kafka().fetch_libs()
    assert list(stack.Kafka.libs().parent.iterdir()) == []
