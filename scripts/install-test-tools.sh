#!/usr/bin/env bash
# Install the system tools the test suite drives for real (shared by `make test` and CI).
#
# Each tool is a Debian package. As root on Debian/Ubuntu the missing ones are installed
# with apt-get; anywhere else one line says what to install, and the script fails.
# Add a tool here, not in .ci/run: a new user's `make test` must get it too.
set -euo pipefail

# "command-to-look-for package" pairs
TOOLS=(
  "redis-server redis-server"
  "promtool prometheus"
  "prometheus prometheus"
  "prometheus-alertmanager prometheus-alertmanager"
  "nginx nginx-light"
  "wrk wrk"
  "taskset util-linux"
  "prlimit util-linux"
  "valgrind valgrind"
  "chromium chromium"
  # the image and compose-stack tests (tests/test_container.py, tests/docker_env.py):
  # an engine (started by the tests when none answers), Debian stand-ins for images no
  # registry gives here (deploy/testing/local-images.sh), compose v1 as Debian ships it
  "dockerd docker.io"
  "debootstrap debootstrap"
  "docker-compose docker-compose"
  "faketime faketime"
  "openssl openssl"
)

# with arguments, only those commands (e.g. the benchmarks' `nginx wrk valgrind`)
missing=()
for pair in "${TOOLS[@]}"; do
  cmd=${pair%% *}
  pkg=${pair##* }
  if (($#)) && [[ " $* " != *" $cmd "* ]]; then
    continue
  fi
  if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
    [[ " ${missing[*]-} " == *" $pkg "* ]] || missing+=("$pkg")
  fi
done
((${#missing[@]})) || exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing test tools: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # the Debian packages start their services; the tests run their own on free ports
  for svc in prometheus prometheus-alertmanager nginx; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
      systemctl stop "$svc" || true
    fi
  done
  exit 0
fi
echo "make test needs these Debian packages (or their equivalents): ${missing[*]} -- install them, e.g. 'sudo apt-get install ${missing[*]}'" >&2
exit 1
