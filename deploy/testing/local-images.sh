#!/usr/bin/env bash
# Give a Docker engine that cannot reach a registry the images a registry would give:
#
#   - local/debian-minbase:bookworm: `debootstrap --variant=minbase` (+ ca-certificates)
#     from the host's Debian mirror, with the host's CA bundle;
#   - the Dockerfile's base (its FROM tag) on it: python3 and python3-venv from Debian,
#     a venv at /usr/local so `python` and `pip` are where the official python image
#     has them;
#   - stand-ins for the compose stack's redis, prometheus and alertmanager images on it,
#     from Debian's packages, tagged as deploy/compose.yaml names them (Debian's
#     prometheus is 2.42, alertmanager 0.25: older than the tags, fine for the stack).
#
# Every image that already exists in the engine, or that a registry gives (`docker pull`,
# unless LOCAL_IMAGES_NO_PULL is set), is left alone: nothing is rebuilt, no second
# debootstrap, so running this again is cheap. Tags come from the Dockerfile and
# deploy/compose.yaml; the Debian mirror from the host's apt sources; the CA bundle from
# the host, so pip in the image build trusts what the host trusts.
#
# Usage (as root: debootstrap needs it):  deploy/testing/local-images.sh
# The engine is the one `docker` talks to (DOCKER_HOST or the default socket). Builds
# use the host network (`docker build --network host`): the stand-in engine the tests
# start has no bridge. Grafana has no Debian package: the stack test runs without it.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
DOCKER=${DOCKER:-docker}
SUITE=bookworm
HOST_CA=${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

log() { echo "local-images: $*" >&2; }
WORK=""  # debootstrap's directory, removed however the script ends
trap '[ -z "$WORK" ] || rm -rf "$WORK"' EXIT
# $1 is present, or pulled where a registry answers (then the real image is used, not a
# stand-in). A stand-in built by an older recipe (label local-images.recipe != $2) is not.
have() {
  local labels
  if labels=$("$DOCKER" image inspect -f '{{json .Config.Labels}}' "$1" 2>/dev/null); then
    case $labels in
      *'"local-images.recipe":"'"$2"'"'*) return 0 ;;
      *'"local-images.recipe"'*) log "$1: built by an older recipe"; return 1 ;;
      *) return 0 ;;
    esac
  fi
  [ -z "${LOCAL_IMAGES_NO_PULL:-}" ] && "$DOCKER" pull -q "$1" >/dev/null 2>&1
}
recipe() { sha256sum | cut -c1-16; }

# The first mirror the host's apt uses for $SUITE itself (not -security / -updates),
# from one-line sources.list files or deb822 *.sources files.
host_mirror() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -r "$f" ] || continue
    awk -v s="$SUITE" '$1 == "deb" { i = 2; if ($2 ~ /^\[/) while ($i !~ /\]$/) i++; if ($2 ~ /^\[/) i++;
      if ($(i + 1) == s) { print $i; exit } }' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    # deb822: paragraphs separated by blank lines; a paragraph names URIs and Suites
    awk -v s="$SUITE" 'BEGIN { RS = ""; FS = "\n" }
      { uri = ""; ok = 0; deb = 0
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^URIs:/) { split($i, a, /[ \t]+/); uri = a[2] }
          if ($i ~ /^Types:/ && $i ~ /[ \t]deb([ \t]|$)/) deb = 1
          if ($i ~ /^Suites:/) { n = split($i, b, /[ \t]+/); for (j = 2; j <= n; j++) if (b[j] == s) ok = 1 }
        }
        if (deb && ok && uri != "") { print uri; exit } }' "$f"
  done
}

base_from_dockerfile() { awk '/^FROM /{ print $2; exit }' "$REPO/Dockerfile"; }
compose_image() { # the image: line of the service $1 in deploy/compose.yaml
  awk -v svc="  $1:" '$0 == svc { on = 1; next } on && /^  [a-z]/ { exit } on && $1 == "image:" { print $2; exit }' \
    "$REPO/deploy/compose.yaml"
}

# Debian minbase from the host's mirror, with the host's CA bundle: the root of every
# image below (one debootstrap; imported as a single layer).
build_minbase() {
  local tag=$1 mirror
  mirror=$(host_mirror | head -n1)
  [ -n "$mirror" ] || { log "no Debian $SUITE mirror in the host's apt sources"; exit 1; }
  command -v debootstrap >/dev/null || { log "debootstrap missing (scripts/install-test-tools.sh)"; exit 1; }
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/local-minbase.XXXXXX")
  local work=$WORK
  log "debootstrap $SUITE minbase from $mirror for $tag"
  debootstrap --variant=minbase --include=ca-certificates \
    "$SUITE" "$work/root" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
  local root=$work/root
  # what the host trusts (pip and apt in the images trust it too)
  cp "$HOST_CA" "$root/etc/ssl/certs/ca-certificates.crt"
  # as Debian's container images: no service starts inside a build
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d" && chmod 755 "$root/usr/sbin/policy-rc.d"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/tmp/* "$root"/dev/*
  tar -C "$root" --numeric-owner -c . | "$DOCKER" import --change 'CMD ["bash"]' \
    --change "LABEL local-images.recipe=$2" - "$tag" >/dev/null
  rm -rf "$work"
}
MINBASE=local/debian-minbase:$SUITE
ensure_minbase() {
  local hash
  hash=$(declare -f build_minbase | recipe)
  LOCAL_IMAGES_NO_PULL=1 have "$MINBASE" "$hash" || build_minbase "$MINBASE" "$hash"
}

# $1 (tag) present, or built from the minbase image + the Dockerfile lines on stdin.
ensure() {
  local tag=$1 body hash
  body="FROM $MINBASE"$'\n'"$(cat)"
  hash=$(printf '%s' "$body" | recipe)
  have "$tag" "$hash" && return 0
  ensure_minbase
  log "building $tag"
  printf '%s\nLABEL local-images.recipe=%s\n' "$body" "$hash" \
    | DOCKER_BUILDKIT=1 "$DOCKER" build -q --network host -t "$tag" - >/dev/null
}

BASE=$(base_from_dockerfile)
REDIS=$(compose_image redis)
PROMETHEUS=$(compose_image prometheus)
ALERTMANAGER=$(compose_image alertmanager)
for v in BASE REDIS PROMETHEUS ALERTMANAGER; do
  [ -n "${!v}" ] || { log "could not read the $v image tag"; exit 1; }
done
APT='apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends'
CLEAN='rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb'

# The python base: Debian's python3 in a venv at /usr/local, so `python` and `pip` are
# where the official image has them; pip told to use the (host's) CA bundle.
ensure "$BASE" <<EOF
RUN $APT python3 python3-venv >/dev/null && $CLEAN \\
 && python3 -m venv /usr/local \\
 && printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > /etc/pip.conf
ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
CMD ["python3"]
EOF

# Stand-ins for the stack, each shaped as the official image is where compose relies on
# it: the command compose gives, the entrypoint, the user, a writable working directory,
# a wget for the healthcheck. Debian's builds default their data to /var/lib/prometheus
# (the official ones to data/ in the working directory): both writable by nobody.
ensure "$REDIS" <<EOF
RUN $APT redis-server >/dev/null && $CLEAN
CMD ["redis-server"]
EOF

ensure "$PROMETHEUS" <<EOF
RUN $APT prometheus wget >/dev/null && $CLEAN \\
 && mkdir -p /prometheus /var/lib/prometheus/metrics2 \\
 && chown -R nobody:nogroup /prometheus /var/lib/prometheus
USER nobody
WORKDIR /prometheus
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
EOF

ensure "$ALERTMANAGER" <<EOF
RUN $APT prometheus-alertmanager wget >/dev/null && $CLEAN \\
 && mkdir -p /alertmanager /var/lib/prometheus/alertmanager \\
 && chown -R nobody:nogroup /alertmanager /var/lib/prometheus
USER nobody
WORKDIR /alertmanager
ENTRYPOINT ["/usr/bin/prometheus-alertmanager"]
CMD ["--config.file=/etc/alertmanager/alertmanager.yml", "--storage.path=/alertmanager"]
EOF

log "ready: $BASE $REDIS $PROMETHEUS $ALERTMANAGER"
