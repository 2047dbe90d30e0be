#!/bin/sh
# Install what deploy/local/stack.py needs on Debian or Ubuntu: a JRE (Kafka 3.9 runs on
# Java 11, 17 or 21), Maven (fetches the Kafka jars once), redis-server, prometheus and
# promtool. Installs only what is missing; does nothing when everything is present.
#
#   sudo deploy/local/install-debian.sh
#
# The Debian packages of redis-server and prometheus start their own service on install
# (6379, and 9090 on all interfaces), which would take the ports the local stack uses.
# This script keeps them from starting while it installs (a temporary policy-rc.d, the
# standard Debian way) and tells you if such a service is running anyway.
#
# WEIR_POLICY_RC_D overrides the policy file's path (default /usr/sbin/policy-rc.d); the
# tests point it into a temporary folder.
set -eu

missing=""
need() { # need <program> <package>
    if ! command -v "$1" >/dev/null 2>&1; then
        case " $missing " in *" $2 "*) ;; *) missing="$missing $2" ;; esac
    fi
}

jre=openjdk-17-jre-headless
if command -v apt-cache >/dev/null 2>&1 &&
    ! apt-cache policy "$jre" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    jre=default-jre-headless # Debian 13 and newer Ubuntu ship 21, which Kafka 3.9 supports
fi
need java "$jre"
need mvn maven
need redis-server redis-server
need prometheus prometheus
need promtool prometheus

if [ -z "$missing" ]; then
    echo "install-debian.sh: java, mvn, redis-server, prometheus and promtool are all present; nothing to do"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-debian.sh: would install:$missing; run as root: sudo $0" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-debian.sh: no apt-get: install$missing with your package manager" >&2
    exit 1
fi

policy=${WEIR_POLICY_RC_D:-/usr/sbin/policy-rc.d}
added_policy=""
# An `if`, not `[ ... ] && rm`: under set -e the && list's status 1 (nothing added) would
# become the script's exit status (issue #10).
cleanup() {
    if [ -n "$added_policy" ]; then rm -f "$policy"; fi
}
trap cleanup EXIT
# Without these, Ctrl-C or a kill would skip the EXIT trap in dash and leave a policy-rc.d
# behind that keeps every service on the machine from starting.
trap 'exit 130' INT
trap 'exit 143' TERM
if [ ! -e "$policy" ]; then
    added_policy=1
    printf '#!/bin/sh\n# added by weir deploy/local/install-debian.sh while installing\nexit 101\n' >"$policy"
    chmod 755 "$policy"
fi

echo "install-debian.sh: installing$missing"
export DEBIAN_FRONTEND=noninteractive
apt_failed() { # apt_failed <status> <what>
    echo "install-debian.sh: \`$2\` failed (exit $1); its output is above." \
        "Fix that (network, a held or broken package, another apt running) and run me again" >&2
    exit "$1"
}
apt-get update || apt_failed $? "apt-get update"
# --no-install-recommends: promtool is in the prometheus package itself; the recommended
# prometheus-node-exporter would only start another service.
# shellcheck disable=SC2086 # word splitting of the package list is intended
apt-get install -y --no-install-recommends $missing ||
    apt_failed $? "apt-get install -y --no-install-recommends$missing"

for prog in java mvn redis-server prometheus promtool; do
    command -v "$prog" >/dev/null 2>&1 || {
        echo "install-debian.sh: $prog is still missing after the install" >&2
        exit 1
    }
done

for port in 6379 9090; do
    if command -v ss >/dev/null 2>&1 && ss -ltnH "sport = :$port" 2>/dev/null | grep -q .; then
        echo "install-debian.sh: something already listens on port $port (a service started" \
            "by the package?): \`ss -ltnp 'sport = :$port'\` shows it; stop it" \
            "(\`systemctl disable --now redis-server prometheus\`) before \`make up\`" >&2
    fi
done
echo "install-debian.sh: done; now run \`make up\`"
