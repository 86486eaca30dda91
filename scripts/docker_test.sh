#!/usr/bin/env bash
# Build the CPU image and check it for real: /ready, a GemFilter chat answer, a non-root user,
# a healthy HEALTHCHECK, every Grafana dashboard query answered by a real Prometheus, and the
# compose profile "replicas": 2 replicas behind HAProxy, requests reach both, a replica failing
# /ready or hung is dropped, Prometheus scrapes each replica (docs/replicas.md).
# Run from anywhere as root (or with a working docker daemon):
#   scripts/docker_test.sh            (make docker-test; .ci/run calls it after make test)
# Needs docker; as root it installs Debian's docker.io (+ debootstrap, docker-compose, prometheus) when missing
# and starts dockerd itself. Where no daemon can run, it prints "SKIPPED: <reason>" and exits 0,
# or 1 with DOCKER_TEST_REQUIRED=1. DOCKER_TEST_NO_SETUP=1 uses only a daemon already running.
# Everything that adapts to a restricted machine (no registry, TLS-intercepting proxy, no PyTorch
# index) lives here, not in docker/Dockerfile:
#   - base image: $BASE_IMAGE, else python:3.11-slim when pullable, else a debootstrap'd bookworm
#   - balancer image: $GEMSERVE_LB_IMAGE, else haproxy:3.0 when pullable, else Debian's haproxy
#     installed on that base image; Prometheus for the replicas: the host's Debian binary
#   - pip trust: the host pip's CA bundle (PIP_CERT / pip config `cert`) as build secret pip_ca
#   - torch: a local torch==2.13.0+cpu wheel the host pip can find, copied into docker/wheels/
#   - package sources: this machine's own, never a host written here (scripts/host_sources.py):
#     the debootstrap mirror from its apt sources ($DEBIAN_MIRROR overrides), torch's deps from
#     the index its pip installs from ($PIP_INDEX_URL, pip config, else that pip's own default).
#     Where none can be found the script fails, saying what it looked at.
# Every wait has a timeout (*_TIMEOUT_S below); the script prints how long each stage took.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
IMAGE="${IMAGE:-gemserve:cpu-test}"
BASE_FALLBACK_TAG="gemserve-base:bookworm"
BUILD_TIMEOUT_S="${BUILD_TIMEOUT_S:-2400}"
READY_TIMEOUT_S="${READY_TIMEOUT_S:-300}"
REQUEST_TIMEOUT_S="${REQUEST_TIMEOUT_S:-600}"
HEALTHY_TIMEOUT_S="${HEALTHY_TIMEOUT_S:-300}"
REPLICAS_TIMEOUT_S="${REPLICAS_TIMEOUT_S:-120}"
LB_DEFAULT_IMAGE="haproxy:3.0"
LB_FALLBACK_TAG="gemserve-haproxy:bookworm"
WORK="$(mktemp -d /tmp/gemserve-docker-test.XXXXXX)"
CONTAINER="gemserve-test-$$"
STARTED_DOCKERD_PID=""
PROMETHEUS_PID=""
COPIED_WHEEL=""
COMPOSE=()
REPLICAS_PROJECT=""
REPLICAS_ENV=()
T0=$SECONDS

log() { printf '[docker-test %4ds] %s\n' "$((SECONDS - T0))" "$*"; }

skip() {
    echo "SKIPPED: docker image test: $*"
    if [ "${DOCKER_TEST_REQUIRED:-0}" = 1 ]; then
        echo "DOCKER_TEST_REQUIRED=1: a skip is a failure" >&2
        exit 1
    fi
    exit 0
}

cleanup() {
    local rc=$?
    if docker inspect "$CONTAINER" >/dev/null 2>&1; then
        if [ "$rc" != 0 ]; then
            echo "--- container log (tail) ---"
            docker logs --tail 40 "$CONTAINER" 2>&1 || true
        fi
        docker rm -f "$CONTAINER" >/dev/null 2>&1 || true
    fi
    [ -n "$COPIED_WHEEL" ] && rm -f "$COPIED_WHEEL"
    [ -n "$REPLICAS_PROJECT" ] && replicas_down "$rc"
    if [ -n "$PROMETHEUS_PID" ]; then
        kill "$PROMETHEUS_PID" 2>/dev/null || true
        wait "$PROMETHEUS_PID" 2>/dev/null || true
    fi
    if [ -n "$STARTED_DOCKERD_PID" ]; then
        kill "$STARTED_DOCKERD_PID" 2>/dev/null || true
        wait "$STARTED_DOCKERD_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
    log "done (exit $rc) in $((SECONDS - T0))s"
}
trap cleanup EXIT

is_root() { [ "$(id -u)" = 0 ]; }

APT_UPDATED=0
apt_install() {
    is_root && command -v apt-get >/dev/null || return 1
    log "installing $* (apt)"
    if [ "$APT_UPDATED" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive timeout 600 apt-get update -qq >>"$WORK/apt.log" 2>&1 \
            || { tail -n 5 "$WORK/apt.log"; return 1; }
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq "$@" >>"$WORK/apt.log" 2>&1 \
        || { tail -n 5 "$WORK/apt.log"; return 1; }
}

ensure_daemon() {
    if [ "${DOCKER_TEST_NO_SETUP:-0}" = 1 ]; then
        docker info >/dev/null 2>&1 || skip "no reachable docker daemon (DOCKER_TEST_NO_SETUP=1: installing/starting nothing)"
        return 0
    fi
    if ! command -v docker >/dev/null || ! command -v dockerd >/dev/null; then
        docker info >/dev/null 2>&1 && return 0
        apt_install docker.io || skip "no docker/dockerd, and docker.io cannot be installed (needs root + apt)"
    fi
    docker info >/dev/null 2>&1 && return 0
    is_root || skip "docker daemon not reachable and not root to start dockerd"
    log "starting dockerd (log: $WORK/dockerd.log)"
    dockerd >"$WORK/dockerd.log" 2>&1 &
    STARTED_DOCKERD_PID=$!
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && return 0
        kill -0 "$STARTED_DOCKERD_PID" 2>/dev/null || break
        sleep 1
    done
    skip "dockerd did not start: $(tail -n 3 "$WORK/dockerd.log" | tr '\n' ' ')"
}

# BuildKit is needed for RUN --mount (build secret, local wheels). Prefer buildx; else a
# pre-23 client (Debian's /usr/bin/docker 20.10) has BuildKit built in.
pick_builder() {
    local client major
    for client in docker /usr/bin/docker; do
        command -v "$client" >/dev/null || continue
        if "$client" buildx version >/dev/null 2>&1; then
            BUILD=("$client" buildx build --load)
            return 0
        fi
        major="$("$client" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1)"
        if [ -n "$major" ] && [ "$major" -lt 23 ] 2>/dev/null; then
            BUILD=(env DOCKER_BUILDKIT=1 "$client" build)
            return 0
        fi
    done
    skip "no BuildKit-capable docker client (install docker-buildx, or use Debian's docker.io client)"
}

pick_base_image() {
    if [ -n "${BASE_IMAGE:-}" ]; then
        return 0
    fi
    if timeout 60 docker pull -q python:3.11-slim >/dev/null 2>&1; then
        BASE_IMAGE=python:3.11-slim
        return 0
    fi
    BASE_IMAGE="$BASE_FALLBACK_TAG"
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "no registry: reusing base image $BASE_IMAGE"
        return 0
    fi
    command -v debootstrap >/dev/null || apt_install debootstrap || skip "no registry and no debootstrap"
    local mirror="${DEBIAN_MIRROR:-}"
    if [ -z "$mirror" ]; then
        mirror="$(python3 "$ROOT/scripts/host_sources.py" apt-mirror --suite bookworm)" \
            || { echo "FAIL no Debian mirror for debootstrap (see above)" >&2; exit 1; }
    fi
    log "no registry: building $BASE_IMAGE with debootstrap (bookworm minbase + python3) from $mirror"
    timeout 900 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$WORK/rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -n 20 "$WORK/debootstrap.log"; echo "debootstrap failed" >&2; exit 1; }
    tar -C "$WORK/rootfs" -c . | docker import - "$BASE_IMAGE" >/dev/null
    rm -rf "$WORK/rootfs"
}

host_python() { if [ -x "$ROOT/.venv/bin/python" ]; then echo "$ROOT/.venv/bin/python"; else command -v python3; fi; }

host_pip() { "$(host_python)" -m pip "$@"; }

# Build args/secrets for this machine; none of them is needed on an ordinary one.
collect_build_options() {
    BUILD_OPTS=(--network host --build-arg "BASE_IMAGE=$BASE_IMAGE")
    local cert index wheel
    cert="${PIP_CERT:-$(host_pip config get global.cert 2>/dev/null || true)}"
    if [ -n "$cert" ] && [ -s "$cert" ]; then
        log "pip CA bundle for the build: $cert"
        BUILD_OPTS+=(--secret "id=pip_ca,src=$cert")
    fi
    # Only a +cpu wheel counts: a plain torch==2.13.0 download would be the multi-GB CUDA build.
    if host_pip download --quiet --no-deps --only-binary :all: -d "$WORK/wheels" "torch==2.13.0+cpu" >/dev/null 2>&1; then
        local found=("$WORK"/wheels/torch-*.whl)
        wheel="${found[0]}"
        if [ ! -e "$ROOT/docker/wheels/$(basename "$wheel")" ]; then
            cp "$wheel" "$ROOT/docker/wheels/" && COPIED_WHEEL="$ROOT/docker/wheels/$(basename "$wheel")"
        fi
        index="$(python3 "$ROOT/scripts/host_sources.py" pip-index --python "$(host_python)")" \
            || { echo "FAIL no package index for torch's dependencies (see above)" >&2; exit 1; }
        log "local torch wheel $(basename "$wheel"); torch's own deps from $index"
        BUILD_OPTS+=(--build-arg "TORCH_INDEX_URL=$index")
    fi
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# The Grafana dashboard's PromQL, evaluated by a real Prometheus scraping the container.
# Prometheus comes from Debian (no registry for its image here); without it this stage is skipped, loudly.
check_dashboard_queries() {
    local gemserve_port=$1 prom_port
    if ! command -v prometheus >/dev/null; then
        apt_install --no-install-recommends prometheus || {
            echo "SKIPPED: dashboard queries: no prometheus binary (apt install prometheus)"
            return 0
        }
    fi
    prom_port="$(free_port)"
    printf 'global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: gemserve\n    static_configs:\n      - targets: ["127.0.0.1:%s"]\n' \
        "$gemserve_port" >"$WORK/prometheus.yml"
    prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/prometheus-data" \
        --web.listen-address="127.0.0.1:$prom_port" >"$WORK/prometheus.log" 2>&1 &
    PROMETHEUS_PID=$!
    log "prometheus $(prometheus --version 2>&1 | head -n 1 | cut -d' ' -f3) on 127.0.0.1:$prom_port"
    for _ in $(seq 1 30); do
        python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$prom_port/-/ready', timeout=2)" \
            2>/dev/null && break
        sleep 1
    done
    python3 "$ROOT/scripts/check_dashboard.py" "http://127.0.0.1:$gemserve_port" "http://127.0.0.1:$prom_port" \
        --timeout "$REQUEST_TIMEOUT_S" || { tail -n 5 "$WORK/prometheus.log"; echo "FAIL dashboard queries" >&2; exit 1; }
    log "ok   every dashboard query returns data from a real Prometheus"
}

# `docker compose config` (plugin) or Debian's docker-compose: both files, alone and combined.
# Sets COMPOSE, which the replicas stage uses too.
validate_compose() {
    if docker compose version >/dev/null 2>&1; then
        COMPOSE=(docker compose)
    elif command -v docker-compose >/dev/null || apt_install --no-install-recommends docker-compose; then
        COMPOSE=(docker-compose)
    else
        echo "SKIPPED: compose validation: neither the compose plugin nor docker-compose (structure: tests/docker)"
        return 0
    fi
    "${COMPOSE[@]}" -f "$ROOT/docker/compose.yaml" config -q
    "${COMPOSE[@]}" -f "$ROOT/docker/compose.yaml" --profile replicas config -q
    "${COMPOSE[@]}" -f "$ROOT/docker/compose.yaml" -f "$ROOT/docker/compose.gpu.yaml" config -q
    log "ok   compose files validate (${COMPOSE[*]} config)"
}

health_status() { docker inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$CONTAINER"; }

wait_healthy() {
    local status=""
    for _ in $(seq 1 "$HEALTHY_TIMEOUT_S"); do
        status="$(health_status)"
        [ "$status" = healthy ] && return 0
        [ "$status" = unhealthy ] && break
        sleep 1
    done
    echo "FAIL healthcheck status '$status' (wanted healthy)" >&2
    docker inspect --format '{{json .State.Health}}' "$CONTAINER" >&2
    exit 1
}

# --- Replicas: the compose profile "replicas" for real (docker/haproxy/haproxy.cfg, docs/replicas.md) ---

replicas_compose() {
    env "${REPLICAS_ENV[@]}" "${COMPOSE[@]}" -p "$REPLICAS_PROJECT" -f "$ROOT/docker/compose.yaml" --profile replicas "$@"
}

replica_ip() { docker inspect --format '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$1"; }

replicas_check() { python3 "$ROOT/scripts/replicas_check.py" "$@"; }

# One check, logged with what it saw; its failure ends the script (a failure inside "$(...)" as an
# argument would not: set -e sees only the outer command).
replicas_step() {
    local out
    out="$(replicas_check "$@")" || exit 1
    log "ok   $out"
}

# Also on failure (called from cleanup): logs first, then the extra containers (they hold the
# compose network), then the project with its volumes.
replicas_down() {
    local rc=$1 name
    if [ "$rc" != 0 ]; then
        echo "--- replicas: compose logs (tail) ---"
        replicas_compose logs --no-color --tail 15 2>&1 || true
    fi
    for name in $(docker ps -aq --filter "label=com.docker.compose.project=$REPLICAS_PROJECT" --filter status=paused); do
        docker unpause "$name" >/dev/null 2>&1 || true
    done
    for name in "$REPLICAS_PROJECT-rogue" "$REPLICAS_PROJECT-prometheus"; do
        docker rm -f "$name" >/dev/null 2>&1 || true
    done
    replicas_compose down -v --remove-orphans -t 5 >"$WORK/replicas-down.log" 2>&1 \
        || { tail -n 5 "$WORK/replicas-down.log"; echo "WARN replicas: compose down failed" >&2; }
    REPLICAS_PROJECT=""
}

# The official haproxy image where it can be pulled (the compose default). Without a registry,
# Debian's haproxy on the base image this script already uses (its apt sources are this
# machine's mirror): the same fallback as the base image's, for the same reason.
pick_lb_image() {
    LB_IMAGE="${GEMSERVE_LB_IMAGE:-$LB_DEFAULT_IMAGE}"
    if docker image inspect "$LB_IMAGE" >/dev/null 2>&1 || timeout 60 docker pull -q "$LB_IMAGE" >/dev/null 2>&1; then
        return 0
    fi
    [ -z "${GEMSERVE_LB_IMAGE:-}" ] || { echo "FAIL balancer image $LB_IMAGE: not local, not pullable" >&2; exit 1; }
    LB_IMAGE="$LB_FALLBACK_TAG"
    if docker image inspect "$LB_IMAGE" >/dev/null 2>&1; then
        log "no registry: reusing balancer image $LB_IMAGE"
        return 0
    fi
    log "no registry: building $LB_IMAGE (Debian's haproxy on $BASE_IMAGE)"
    # policy-rc.d: apt must not start the service during the build; the container runs haproxy
    # itself, as the official image does (same config path, foreground master-worker, soft stop).
    timeout 600 "${BUILD[@]}" --network host -t "$LB_IMAGE" - >"$WORK/lb-build.log" 2>&1 <<EOF \
        || { tail -n 20 "$WORK/lb-build.log"; echo "FAIL balancer image build" >&2; exit 1; }
FROM $BASE_IMAGE
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d \
    && apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy \
    && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d \
    && mkdir -p /usr/local/etc/haproxy
USER haproxy
STOPSIGNAL SIGUSR1
CMD ["haproxy", "-W", "-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]
EOF
}

# Prometheus with docker/prometheus/prometheus.yml as shipped, inside the project network so its
# DNS-SD job resolves "gemserve-replica" as in compose. Its image cannot be pulled here, so the
# host's Debian prometheus binary (it links only libc) runs on the base image.
replicas_prometheus_check() {
    local prom_bin port
    prom_bin="$(command -v prometheus || true)"
    if [ -z "$prom_bin" ]; then
        echo "SKIPPED: replicas: Prometheus DNS-SD scrape: no prometheus binary on the host"
        return 0
    fi
    docker run -d --name "$REPLICAS_PROJECT-prometheus" --network "${REPLICAS_PROJECT}_default" --user 65534:65534 \
        -p 127.0.0.1::9090 -v "$(readlink -f "$prom_bin"):/usr/local/bin/prometheus:ro" \
        -v "$ROOT/docker/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" \
        --entrypoint /usr/local/bin/prometheus "$BASE_IMAGE" \
        --config.file=/etc/prometheus/prometheus.yml --storage.tsdb.path=/tmp/prometheus >/dev/null
    port="$(docker port "$REPLICAS_PROJECT-prometheus" 9090/tcp | head -n 1 | sed 's/.*://')"
    replicas_step prometheus "http://127.0.0.1:$port" --job gemserve-replica --addr "$1:8000" --addr "$2:8000" \
        --timeout 60
    docker rm -f "$REPLICAS_PROJECT-prometheus" >/dev/null
}

check_replicas() {
    local t_stage=$SECONDS lb_port stats_port stats lb ids a b ip_a ip_b names name_a name_b
    local rogue rogue_ip rogue_port t_pause
    if [ "${#COMPOSE[@]}" = 0 ]; then
        echo "SKIPPED: replicas: neither the compose plugin nor docker-compose"
        return 0
    fi
    pick_lb_image
    lb_port="$(free_port)"
    stats_port="$(free_port)"
    lb="http://127.0.0.1:$lb_port"
    stats="http://127.0.0.1:$stats_port/stats;csv"
    REPLICAS_ENV=("GEMSERVE_IMAGE=$IMAGE" "GEMSERVE_LB_IMAGE=$LB_IMAGE" GEMSERVE_REPLICAS=2
        "GEMSERVE_LB_PUBLISH_PORT=$lb_port" "GEMSERVE_LB_STATS_PUBLISH_PORT=$stats_port")
    REPLICAS_PROJECT="gemserve-replicas-$$"
    log "replicas: ${COMPOSE[*]} -p $REPLICAS_PROJECT --profile replicas up: 2 x $IMAGE behind $LB_IMAGE"
    replicas_compose up -d --no-build gemserve-replica balancer >"$WORK/replicas-up.log" 2>&1 \
        || { tail -n 20 "$WORK/replicas-up.log"; echo "FAIL replicas: compose up" >&2; exit 1; }
    ids="$(docker ps -q --filter "label=com.docker.compose.project=$REPLICAS_PROJECT" \
        --filter "label=com.docker.compose.service=gemserve-replica")"
    if [ "$(echo "$ids" | grep -c .)" != 2 ]; then
        echo "FAIL replicas: wanted 2 gemserve-replica containers, got: $ids" >&2
        exit 1
    fi
    a="$(echo "$ids" | sed -n 1p)"
    b="$(echo "$ids" | sed -n 2p)"
    ip_a="$(replica_ip "$a")"
    ip_b="$(replica_ip "$b")"

    names="$(replicas_check wait "$stats" --addr "$ip_a:8000" --addr "$ip_b:8000" --state UP \
        --timeout "$REPLICAS_TIMEOUT_S")"
    read -r name_a name_b <<<"$names"
    log "ok   both replicas UP in HAProxy (found by DNS, /ready 200): $name_a=$ip_a $name_b=$ip_b"
    replicas_step send "$lb" --count 10 --allow "$name_a,$name_b" --require "$name_a,$name_b"
    replicas_prometheus_check "$ip_a" "$ip_b"

    # A replica that is alive but cannot serve: the service's network alias, a model that does not exist.
    rogue="$REPLICAS_PROJECT-rogue"
    docker run -d --name "$rogue" --network "${REPLICAS_PROJECT}_default" --network-alias gemserve-replica \
        -p 127.0.0.1::8000 -e GEMSERVE_MODEL=/nonexistent/model "$IMAGE" >/dev/null
    rogue_ip="$(replica_ip "$rogue")"
    rogue_port="$(docker port "$rogue" 8000/tcp | head -n 1 | sed 's/.*://')"
    log "rogue replica $rogue (same alias, GEMSERVE_MODEL=/nonexistent/model) at $rogue_ip"
    replicas_step probe "http://127.0.0.1:$rogue_port" --timeout "$REPLICAS_TIMEOUT_S"
    replicas_check wait "$stats" --addr "$rogue_ip:8000" --state DOWN --timeout 60 >/dev/null
    log "ok   HAProxy found it by DNS and marks it DOWN"
    replicas_step send "$lb" --count 10 --allow "$name_a,$name_b" --require "$name_a,$name_b" \
        --stats "$stats" --unused-addr "$rogue_ip:8000"

    # A hung replica: paused, it still accepts TCP connections but answers nothing.
    t_pause=$SECONDS
    docker pause "$a" >/dev/null
    replicas_check wait "$stats" --addr "$ip_a:8000" --state DOWN --timeout 60 >/dev/null
    log "ok   paused $name_a marked DOWN after $((SECONDS - t_pause))s (2 checks timed out)"
    replicas_step send "$lb" --count 10 --allow "$name_b" --require "$name_b"
    docker unpause "$a" >/dev/null
    t_pause=$SECONDS
    replicas_check wait "$stats" --addr "$ip_a:8000" --state UP --timeout 60 >/dev/null
    log "ok   unpaused $name_a UP again after $((SECONDS - t_pause))s"
    replicas_step send "$lb" --count 4 --allow "$name_a,$name_b" --require "$name_a,$name_b"

    replicas_down 0
    log "ok   replicas stage in $((SECONDS - t_stage))s"
}

main() {
    ensure_daemon
    validate_compose
    pick_builder
    pick_base_image
    collect_build_options
    log "building $IMAGE from docker/Dockerfile (base $BASE_IMAGE)"
    local t_build=$SECONDS
    timeout "$BUILD_TIMEOUT_S" "${BUILD[@]}" "${BUILD_OPTS[@]}" -f "$ROOT/docker/Dockerfile" -t "$IMAGE" "$ROOT" \
        >"$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log"; echo "FAIL image build" >&2; exit 1; }
    log "built in $((SECONDS - t_build))s; size $(docker image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}')"

    docker run -d --name "$CONTAINER" -p 127.0.0.1::8000 "$IMAGE" >/dev/null
    local port
    port="$(docker port "$CONTAINER" 8000/tcp | head -n 1 | sed 's/.*://')"
    log "container $CONTAINER on 127.0.0.1:$port"
    python3 "$ROOT/scripts/docker_smoke.py" "http://127.0.0.1:$port" \
        --ready-timeout "$READY_TIMEOUT_S" --request-timeout "$REQUEST_TIMEOUT_S"

    local uid
    uid="$(docker exec "$CONTAINER" id -u)"
    [ "$uid" != 0 ] || { echo "FAIL container runs as root" >&2; exit 1; }
    log "ok   container user uid=$uid (non-root)"

    wait_healthy
    log "ok   HEALTHCHECK reports healthy"

    check_dashboard_queries "$port"
    check_replicas
    echo "PASSED: docker image test ($IMAGE) in $((SECONDS - T0))s"
}

main "$@"
