"""deploy/local/install-debian.sh in each state a machine can be in (issue #10).

Nothing is installed: the script runs with a PATH that holds only a folder of shims. A fake
``apt-get`` records its arguments and, for ``install``, whether the policy file exists then and
what it answers, and "installs" a package by putting stub programs in the shim folder. Fake
``apt-cache`` and ``id`` answer as a Debian 12 root shell would. ``java``, ``mvn``,
``redis-server``, ``prometheus`` and ``promtool`` are stubs when a test says they are present
and absent otherwise. ``WEIR_POLICY_RC_D`` points the policy file into the test's folder, so
the real ``/usr/sbin/policy-rc.d`` is never touched.

Each test runs the script under ``sh`` (dash: the shebang, ``sudo deploy/local/install-debian.sh``)
and ``bash`` (``make deps``).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "local" / "install-debian.sh"
PROGRAMS = ("java", "mvn", "redis-server", "prometheus", "promtool")
# External commands the script (and the apt-get shim) use besides the ones it checks for.
TOOLS = ("grep", "chmod", "rm")
SHELLS = ("sh", "bash")

APT_GET = r"""#!/bin/sh
# Records its argv; on install, records the policy file's state and answer, then "installs".
log="$SHIM_DIR/apt-get.log"
echo "argv: $*" >>"$log"
case "$1" in
update)
    if [ -n "${SHIM_FAIL:-}" ] && [ "$SHIM_FAIL" = update ]; then
        echo "E: shim: could not reach the mirror" >&2
        exit 100
    fi
    exit 0 ;;
install) ;;
*) echo "E: shim: unexpected command $1" >&2; exit 100 ;;
esac
if [ -e "$WEIR_POLICY_RC_D" ]; then
    answer=0
    "$WEIR_POLICY_RC_D" redis-server start || answer=$?
    echo "policy-rc.d: present, answers $answer" >>"$log"
else
    echo "policy-rc.d: absent" >>"$log"
fi
case "${SHIM_FAIL:-}" in
install) echo "E: shim: Unable to fetch some archives" >&2; exit 100 ;;
term) kill -TERM "$PPID"; exit 0 ;;
esac
shift
for pkg in "$@"; do
    case "$pkg" in
    -*) continue ;;
    openjdk-17-jre-headless | default-jre-headless) progs=java ;;
    maven) progs=mvn ;;
    redis-server) progs=redis-server ;;
    prometheus) progs="prometheus promtool" ;;
    *) echo "E: shim: Unable to locate package $pkg" >&2; exit 100 ;;
    esac
    for p in $progs; do
        printf '#!/bin/sh\nexit 0\n' >"$SHIM_DIR/$p"
        chmod 755 "$SHIM_DIR/$p"
    done
done
"""

APT_CACHE = r"""#!/bin/sh
[ "$1" = policy ] || exit 100
echo "$2:"
echo "  Installed: (none)"
echo "  Candidate: ${SHIM_JRE_CANDIDATE:-17.0.15+6-1~deb12u1}"
"""

ID = r"""#!/bin/sh
[ "$1" = -u ] || exit 1
echo "${SHIM_UID:-0}"
"""

# What a container image's own policy file might hold; mode 0700 so a changed mode shows.
IMAGE_POLICY = b"#!/bin/sh\n# the image's own policy: no service starts in a container\nexit 101\n"
IMAGE_POLICY_MODE = 0o700


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    apt_log: list[str]


class Machine:
    """A shim folder standing in for a Debian machine's PATH, and its policy-rc.d path."""

    def __init__(self, root: Path, present: tuple[str, ...] = ()) -> None:
        self.bin = root / "bin"
        self.bin.mkdir()
        self.policy = root / "policy-rc.d"
        for name, body in (("apt-get", APT_GET), ("apt-cache", APT_CACHE), ("id", ID)):
            self.write(name, body)
        for prog in present:
            self.write(prog, "#!/bin/sh\nexit 0\n")
        for tool in TOOLS:
            real = shutil.which(tool)
            assert real, f"{tool} is needed to run the install script"
            (self.bin / tool).symlink_to(real)

    def write(self, name: str, body: str) -> None:
        path = self.bin / name
        path.write_text(body)
        path.chmod(0o755)

    def add_image_policy(self) -> None:
        self.policy.write_bytes(IMAGE_POLICY)
        self.policy.chmod(IMAGE_POLICY_MODE)

    def assert_policy_as_before(self, image_policy: bool) -> None:
        """The image's own policy file is as it was (bytes and mode); without one, the
        script left none behind."""
        if image_policy:
            assert self.policy.read_bytes() == IMAGE_POLICY
            assert mode(self.policy) == IMAGE_POLICY_MODE
        else:
            assert not self.policy.exists()

    def run(self, shell: str, **env: str) -> Run:
        interpreter = shutil.which(shell)
        assert interpreter, f"{shell} is not installed"
        # Only the shim folder is on PATH, so the machine's own java, mvn, apt-get... are hidden.
        full_env = {
            "PATH": str(self.bin),
            "SHIM_DIR": str(self.bin),
            "WEIR_POLICY_RC_D": str(self.policy),
            "LC_ALL": "C",
            **env,
        }
        res = subprocess.run(
            [interpreter, str(SCRIPT)],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        log = self.bin / "apt-get.log"
        lines = log.read_text().splitlines() if log.exists() else []
        return Run(res.returncode, res.stdout, res.stderr, lines)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_shims_hide_the_real_programs(tmp_path: Path) -> None:
    """Guard for every test below: with PATH=shims, the machine's own programs are not found."""
    machine = Machine(tmp_path)
    for prog in PROGRAMS:
        assert not (machine.bin / prog).exists()
    res = subprocess.run(
        [shutil.which("sh") or "/bin/sh", "-c", "command -v java mvn redis-server prometheus"],
        env={"PATH": str(machine.bin)},
        capture_output=True,
        text=True,
    )
    assert res.stdout == "", res.stdout


def test_makefile_runs_the_script_with_a_tested_shell() -> None:
    makefile = (REPO / "Makefile").read_text()
    found = re.search(r"^\t@?(\S+) deploy/local/install-debian\.sh\s*$", makefile, re.MULTILINE)
    assert found, "the Makefile's deps recipe no longer runs deploy/local/install-debian.sh"
    assert found.group(1) in SHELLS, f"make deps runs it with {found.group(1)}; test that shell"


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("policy_exists", [True, False], ids=["policy-exists", "no-policy"])
def test_nothing_missing_does_nothing(tmp_path: Path, shell: str, policy_exists: bool) -> None:
    machine = Machine(tmp_path, present=PROGRAMS)
    if policy_exists:
        machine.add_image_policy()
    res = machine.run(shell)
    assert res.rc == 0, res.stderr
    assert "all present; nothing to do" in res.stdout
    assert res.apt_log == []
    machine.assert_policy_as_before(policy_exists)


@pytest.mark.parametrize("shell", SHELLS)
def test_missing_packages_with_a_policy_file_already_there(tmp_path: Path, shell: str) -> None:
    """The state of issue #10: many images ship policy-rc.d; the script must still exit 0."""
    machine = Machine(tmp_path, present=("java", "mvn"))
    machine.add_image_policy()
    res = machine.run(shell)
    assert res.rc == 0, f"exit {res.rc}\n{res.stdout}\n{res.stderr}"
    assert res.apt_log == [
        "argv: update",
        "argv: install -y --no-install-recommends redis-server prometheus",
        "policy-rc.d: present, answers 101",
    ]
    machine.assert_policy_as_before(image_policy=True)
    assert "install-debian.sh: done" in res.stdout


@pytest.mark.parametrize("shell", SHELLS)
def test_missing_packages_without_a_policy_file(tmp_path: Path, shell: str) -> None:
    machine = Machine(tmp_path)
    res = machine.run(shell)
    assert res.rc == 0, f"exit {res.rc}\n{res.stdout}\n{res.stderr}"
    assert res.apt_log == [
        "argv: update",
        "argv: install -y --no-install-recommends openjdk-17-jre-headless maven redis-server prometheus",
        # The script's own policy file kept the packages' services from starting...
        "policy-rc.d: present, answers 101",
    ]
    # ...and is gone afterwards, so services start normally again.
    assert not machine.policy.exists()
    assert "install-debian.sh: done" in res.stdout


def test_without_a_jre_17_candidate_it_installs_the_default_jre(tmp_path: Path) -> None:
    machine = Machine(tmp_path, present=("mvn", "redis-server", "prometheus", "promtool"))
    res = machine.run("sh", SHIM_JRE_CANDIDATE="(none)")
    assert res.rc == 0, res.stderr
    assert "argv: install -y --no-install-recommends default-jre-headless" in res.apt_log


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("policy_exists", [True, False], ids=["policy-exists", "no-policy"])
@pytest.mark.parametrize(
    ("fail", "command"),
    [
        ("update", "apt-get update"),
        ("install", "apt-get install -y --no-install-recommends redis-server prometheus"),
    ],
)
def test_failing_apt_get_exits_non_zero_and_says_so(
    tmp_path: Path, shell: str, policy_exists: bool, fail: str, command: str
) -> None:
    machine = Machine(tmp_path, present=("java", "mvn"))
    if policy_exists:
        machine.add_image_policy()
    res = machine.run(shell, SHIM_FAIL=fail)
    assert res.rc == 100, f"exit {res.rc}\n{res.stderr}"
    assert f"install-debian.sh: `{command}` failed (exit 100)" in res.stderr
    assert "install-debian.sh: done" not in res.stdout
    machine.assert_policy_as_before(policy_exists)


@pytest.mark.parametrize("shell", SHELLS)
def test_killed_during_the_install_removes_the_policy_file_it_added(tmp_path: Path, shell: str) -> None:
    """A policy-rc.d left behind would keep every service on the machine from starting."""
    machine = Machine(tmp_path)
    res = machine.run(shell, SHIM_FAIL="term")
    assert res.rc == 143, f"exit {res.rc}\n{res.stderr}"
    assert "policy-rc.d: present, answers 101" in res.apt_log
    assert not machine.policy.exists()


def test_not_root_says_what_it_would_install_and_installs_nothing(tmp_path: Path) -> None:
    machine = Machine(tmp_path, present=("java", "mvn", "prometheus", "promtool"))
    res = machine.run("sh", SHIM_UID="1000")
    assert res.rc == 1
    assert "would install: redis-server; run as root: sudo " in res.stderr
    assert res.apt_log == []
    assert not machine.policy.exists()


def test_the_script_is_executable_for_sudo() -> None:
    """The docs say `sudo deploy/local/install-debian.sh`, which needs the executable bit."""
    assert os.access(SCRIPT, os.X_OK)
