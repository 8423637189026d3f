#!/usr/bin/env bash
# Build the real smsp container image and run it, with no Docker engine and no
# container registry: podman (runc, cgroupfs) on a local base image made with
# debootstrap. Run from the repo root as root:   bash scripts/image-test.sh
#
# Checks (each prints PASS/FAIL):
#   1. POST /email (mock mode) answered 200 by the containerised server
#   2. GET /healthcheck answers 200
#   3. `podman healthcheck run` (the image's HEALTHCHECK) reports healthy
#   4. the service process in the container is not root
#   5. PID 1 is `python -m smsp`, running from bytecode compiled at build
#   6. its resident set (VmRSS) is under 25 MB
#   7. `podman stop` (SIGTERM, default 10 s timeout) ends it in under 2 s
#
# The local base image (localhost/smsp-base:bookworm, a bookworm minbase root
# with python3-minimal + libpython3-stdlib) is made once per machine and
# reused. Settings (environment):
#   SMSP_BASE_IMAGE        base image name      (default localhost/smsp-base:bookworm)
#   SMSP_IMAGE             image to build       (default localhost/smsp:test)
#   IMAGE_TEST_CONTEXT     build context        (default: the repo root)
#   IMAGE_TEST_STOP_MAX_MS stop-time limit, ms  (default 2000)
#   IMAGE_TEST_RSS_MAX_KB  VmRSS limit, kB      (default 25600)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONTEXT="${IMAGE_TEST_CONTEXT:-$REPO_ROOT}"
BASE_IMAGE="${SMSP_BASE_IMAGE:-localhost/smsp-base:bookworm}"
IMAGE="${SMSP_IMAGE:-localhost/smsp:test}"
STOP_MAX_MS="${IMAGE_TEST_STOP_MAX_MS:-2000}"
RSS_MAX_KB="${IMAGE_TEST_RSS_MAX_KB:-25600}"
SUITE=bookworm
CTR="smsp-image-test-$$"
export DEBIAN_FRONTEND=noninteractive

passed=0
failed=0
log() { printf 'image-test: %s\n' "$*"; }
die() { printf 'image-test: ERROR: %s\n' "$*" >&2; exit 1; }
pass() { passed=$((passed + 1)); printf 'image-test: PASS %s\n' "$*"; }
fail() { failed=$((failed + 1)); printf 'image-test: FAIL %s\n' "$*" >&2; }

[ "$(id -u)" -eq 0 ] || die "must run as root (podman with runc/cgroupfs, debootstrap)"
[ -f "$CONTEXT/smsp.py" ] || die "no smsp.py in build context $CONTEXT"
[ -f "$REPO_ROOT/Dockerfile" ] || die "no Dockerfile in $REPO_ROOT"
command -v python3 >/dev/null || die "python3 is needed on the host for the HTTP checks"

WORKDIR="$(mktemp -d /tmp/smsp-image-test.XXXXXX)"
cleanup() {
    local rc=$?
    if command -v podman >/dev/null 2>&1; then
        podman rm -f -t 0 "$CTR" >/dev/null 2>&1 || true
    fi
    rm -rf "$WORKDIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- tools -------------------------------------------------------------------
missing=()
command -v podman >/dev/null 2>&1 || missing+=(podman)
command -v runc >/dev/null 2>&1 || missing+=(runc)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]} with apt-get"
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# crun refuses these machines' hybrid cgroup setup; podman's default ulimits
# are above what the machine allows; there is no systemd.
cat >"$WORKDIR/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF="$WORKDIR/containers.conf"
log "podman $(podman version --format '{{.Client.Version}}' 2>/dev/null || echo '?'), $(runc --version | head -n1)"

# --- local base image (once per machine) -------------------------------------
# First `deb` source for the plain suite in the machine's apt configuration
# (one-line .list files and deb822 .sources files), else deb.debian.org.
apt_mirror() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk -v suite="$SUITE" '
            /^[[:space:]]*#/ { next }
            $1 == "deb" {
                i = 2
                if ($i ~ /^\[/) { while ($i !~ /\]$/ && i < NF) i++; i++ }
                if ($(i + 1) == suite) { print $i; exit }
            }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v suite="$SUITE" '
            function flush() {
                if (types ~ /(^|[[:space:]])deb([[:space:]]|$)/ && enabled != "no" &&
                    (" " suites " ") ~ (" " suite " ") && uri != "") { print uri; found = 1 }
                types = ""; suites = ""; uri = ""; enabled = ""
            }
            /^[[:space:]]*#/ { next }
            /^[[:space:]]*$/ { flush(); if (found) exit; next }
            tolower($1) == "types:"   { $1 = ""; types = $0 }
            tolower($1) == "suites:"  { $1 = ""; suites = $0; gsub(/[[:space:]]+/, " ", suites) }
            tolower($1) == "uris:"    { uri = $2 }
            tolower($1) == "enabled:" { enabled = tolower($2) }
            END { if (!found) flush() }' "$f"
    done
    echo "http://deb.debian.org/debian"
}

if podman image exists "$BASE_IMAGE"; then
    log "base image $BASE_IMAGE exists (cached)"
else
    MIRROR="$(apt_mirror)"
    MIRROR="${MIRROR%%$'\n'*}" # first one (no `| head`: SIGPIPE under pipefail)
    log "making base image $BASE_IMAGE: debootstrap $SUITE minbase from $MIRROR (about a minute)"
    ROOTFS="$WORKDIR/rootfs"
    if ! debootstrap --variant=minbase --include=python3-minimal,libpython3-stdlib \
        "$SUITE" "$ROOTFS" "$MIRROR" >"$WORKDIR/debootstrap.log" 2>&1; then
        tail -n 30 "$WORKDIR/debootstrap.log" >&2
        [ -f "$ROOTFS/debootstrap/debootstrap.log" ] && tail -n 30 "$ROOTFS/debootstrap/debootstrap.log" >&2
        die "debootstrap failed"
    fi
    ln -sf python3 "$ROOTFS/usr/bin/python"
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/debootstrap
    tar --numeric-owner -C "$ROOTFS" -cf "$WORKDIR/rootfs.tar" .
    rm -rf "$ROOTFS"
    podman import --quiet --change 'CMD ["python"]' "$WORKDIR/rootfs.tar" "$BASE_IMAGE" >/dev/null
    rm -f "$WORKDIR/rootfs.tar"
    podman run --rm --network none "$BASE_IMAGE" python -c 'import sys; print("image-test: base image python", sys.version.split()[0])' \
        || { podman rmi -f "$BASE_IMAGE" >/dev/null 2>&1 || true; die "base image has no working python"; }
fi

# --- build -------------------------------------------------------------------
old_id="$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)"
log "building $IMAGE from $CONTEXT (BASE=$BASE_IMAGE)"
if ! podman build --format docker --pull=never --build-arg "BASE=$BASE_IMAGE" \
    -f "$REPO_ROOT/Dockerfile" -t "$IMAGE" "$CONTEXT" >"$WORKDIR/build.log" 2>&1; then
    cat "$WORKDIR/build.log" >&2
    die "podman build failed"
fi
new_id="$(podman image inspect --format '{{.Id}}' "$IMAGE")"
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
    podman rmi "$old_id" >/dev/null 2>&1 || true # drop the previous test build
fi
podman image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE" | grep -q healthcheck \
    || die "built image has no HEALTHCHECK (was --format docker honoured?)"

# --- run ---------------------------------------------------------------------
PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
log "running $CTR on 127.0.0.1:$PORT (host network, mock mode, read-only root, no capabilities)"
podman run -d --name "$CTR" --network host \
    --read-only --cap-drop ALL --security-opt no-new-privileges \
    -e SMSP_HOST=127.0.0.1 -e SMSP_PORT="$PORT" \
    -e SMSP_MOCK_EMAIL_SERVICE=true -e SMSP_API_KEY=dev \
    -e SMSP_WORKERS=1 -e SMSP_LOG_OUTPUT_FORMAT=JSON_ONELINE \
    "$IMAGE" >"$WORKDIR/run.out" 2>"$WORKDIR/run.err" || {
    cat "$WORKDIR/run.out" "$WORKDIR/run.err" >&2
    die "podman run failed"
}
# Without systemd podman cannot arm the healthcheck timer; it says so on
# stderr, and that is expected: the healthcheck is run by hand below.
grep -v -iE 'systemd|healthcheck|timer' "$WORKDIR/run.err" >&2 || true

# http METHOD PATH [BODY] -> prints "STATUS BODY"; extra headers for POST.
http() {
    python3 - "$PORT" "$@" <<'PY'
import sys, urllib.request, urllib.error
port, method, path = sys.argv[1], sys.argv[2], sys.argv[3]
data = sys.argv[4].encode() if len(sys.argv) > 4 else None
req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
if data is not None:
    req.add_header("Content-Type", "application/json")
    req.add_header("X-API-KEY", "dev")
try:
    with urllib.request.urlopen(req, timeout=5) as r:
        print(r.status, r.read().decode(errors="replace")[:300])
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode(errors="replace")[:300])
except Exception as e:
    print(0, f"{type(e).__name__}: {e}")
PY
}

ctr_running() { [ "$(podman inspect --format '{{.State.Running}}' "$CTR" 2>/dev/null)" = "true" ]; }

ready=0
for _ in $(seq 1 100); do # up to ~20 s
    ctr_running || break
    if [ "$(http GET /healthcheck | cut -d' ' -f1)" = "200" ]; then ready=1; break; fi
    sleep 0.2
done
if [ "$ready" -ne 1 ]; then
    podman logs "$CTR" >&2 || true
    ctr_running || die "container exited early (state: $(podman inspect --format '{{.State.Status}} exit={{.State.ExitCode}}' "$CTR"))"
    die "server did not answer /healthcheck on 127.0.0.1:$PORT within 20 s"
fi

# 1. POST /email in mock mode, answered by the containerised server
log "check: POST /email (mock mode) -> 200"
out="$(http POST /email '{"fromaddress":"a@example.com","toaddress":"b@example.com","subject":"hi","plaintextbody":"x"}')"
if [ "${out%% *}" = "200" ] && ctr_running; then pass "POST /email -> $out"; else fail "POST /email -> $out"; fi

# 2. /healthcheck
log "check: GET /healthcheck -> 200"
out="$(http GET /healthcheck)"
if [ "${out%% *}" = "200" ]; then pass "GET /healthcheck -> $out"; else fail "GET /healthcheck -> $out"; fi

# 3. the image's HEALTHCHECK, run by hand (no systemd timer here)
log "check: podman healthcheck run -> healthy"
if hc_out="$(podman healthcheck run "$CTR" 2>&1)"; then
    pass "podman healthcheck run -> ${hc_out:-healthy}"
else
    fail "podman healthcheck run -> ${hc_out:-exit non-zero}"
fi

# 4. not root inside the container
log "check: container process is not root"
uid="$(podman exec "$CTR" id -u 2>&1 || true)"
pid1_user="$(podman top "$CTR" user 2>/dev/null | awk 'NR == 2 { print $1 }' || true)"
if [[ "$uid" =~ ^[0-9]+$ ]] && [ "$uid" -ne 0 ] && [ -n "$pid1_user" ] && [ "$pid1_user" != "root" ]; then
    pass "uid $uid (process user: $pid1_user)"
else
    fail "uid '$uid', process user '$pid1_user'"
fi

# 5. PID 1 is `python -m smsp`, and the bytecode it runs from was compiled at
#    build from this very smsp.py (checked-hash .pyc whose hash is the source's)
log "check: PID 1 runs smsp from bytecode compiled at build"
cmdline="$(podman exec "$CTR" cat /proc/1/cmdline 2>/dev/null | tr '\0' ' ' || true)"
pyc="$(podman exec "$CTR" python -c '
import importlib.util, sys
source = open("/app/smsp.py", "rb").read()
cached = importlib.util.cache_from_source("/app/smsp.py")
header = open(cached, "rb").read(16)
flags = int.from_bytes(header[4:8], "little")
ok = flags == 3 and header[8:16] == importlib.util.source_hash(source)
print(("ok " if ok else "stale ") + cached)
' 2>&1 || true)"
if [ "$cmdline" = "python -m smsp " ] && [ "${pyc%% *}" = "ok" ]; then
    pass "PID 1: ${cmdline% }; ${pyc#ok }"
else
    fail "PID 1: '$cmdline'; bytecode: $pyc"
fi

# 6. memory: PID 1's resident set after these few requests (issue target: idle RSS
#    under 25 MB). Compiling smsp or the stdlib at start would show here.
log "check: PID 1 resident set under ${RSS_MAX_KB} kB"
rss_kb="$(podman exec "$CTR" awk '/^VmRSS:/ { print $2 }' /proc/1/status 2>/dev/null || true)"
if [[ "$rss_kb" =~ ^[0-9]+$ ]] && [ "$rss_kb" -lt "$RSS_MAX_KB" ]; then
    pass "VmRSS $rss_kb kB"
else
    fail "VmRSS '$rss_kb' kB"
fi

# 7. graceful stop: SIGTERM to PID 1 must end it well inside podman's 10 s
log "check: podman stop ends it in under ${STOP_MAX_MS} ms"
t0="$(date +%s%N)"
podman stop "$CTR" >/dev/null 2>"$WORKDIR/stop.err" || true
t1="$(date +%s%N)"
stop_ms=$(((t1 - t0) / 1000000))
exit_code="$(podman inspect --format '{{.State.ExitCode}}' "$CTR" 2>/dev/null || echo '?')"
after="$(http GET /healthcheck)"
if [ "$stop_ms" -lt "$STOP_MAX_MS" ] && ! ctr_running && [ "${after%% *}" = "0" ]; then
    pass "podman stop took ${stop_ms} ms (exit code $exit_code; port closed afterwards)"
else
    fail "podman stop took ${stop_ms} ms (exit code $exit_code; after stop: $after)"
    cat "$WORKDIR/stop.err" >&2 || true
fi

if [ "$failed" -ne 0 ]; then
    log "container logs:"
    podman logs "$CTR" 2>&1 | tail -n 40 >&2 || true
    printf 'image-test: FAILED: %d passed, %d failed\n' "$passed" "$failed" >&2
    exit 1
fi
printf 'image-test: %d passed, %d failed\n' "$passed" "$failed"
