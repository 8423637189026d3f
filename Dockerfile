# smsp: single-file, stdlib-only email-sending HTTP proxy.
#
# The published build uses the official slim image. An offline build can
# substitute any local base that has `python` on PATH (scripts/image-test.sh
# builds one with debootstrap): podman build --build-arg BASE=<image> .
ARG BASE=python:3.12-slim
FROM ${BASE}

# Unprivileged runtime user. The numeric UID/GID (10001) is what
# deploy/kubernetes.yaml sets as runAsUser/runAsGroup; keep them in step.
# useradd/groupadd come from Debian's `passwd` package (present in the slim
# image and in a debootstrap minbase root); the fallback writes the entries
# directly for a base without them.
RUN if command -v useradd >/dev/null 2>&1; then \
        groupadd --system --gid 10001 smsp \
        && useradd --system --uid 10001 --gid 10001 --no-create-home \
           --home-dir /nonexistent --shell /usr/sbin/nologin smsp; \
    else \
        echo 'smsp:x:10001:' >> /etc/group \
        && echo 'smsp:x:10001:10001:smsp:/nonexistent:/usr/sbin/nologin' >> /etc/passwd; \
    fi

WORKDIR /app

# Only the program itself (see .dockerignore); owned by root, readable (not
# writable) by the service user whatever the checkout's umask was.
# No pip install: smsp is stdlib-only.
COPY --chmod=0644 smsp.py /app/smsp.py

# Bytecode for smsp and for every standard-library module it imports, compiled
# here: the python images ship no .pyc files, and at run time nothing can be
# cached (read-only root, PYTHONDONTWRITEBYTECODE), so each start would compile
# them all again. smsp's own is checked against the source by hash at every
# start: a smsp.py mounted over this one is compiled afresh, never run stale.
# Started as a module (CMD below), smsp runs from this bytecode and idles at
# 24.5 MB instead of 37.0 (docs/benchmark.md): CPython keeps the syntax tree of a script run as
# `python smsp.py` (6 MB for this file) for as long as the script runs.
RUN python -m compileall -q --invalidation-mode checked-hash /app/smsp.py \
    && python -c "import smsp"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SMSP_HOST=0.0.0.0 \
    SMSP_PORT=8080

USER 10001:10001

EXPOSE 8080

# Stdlib-only probe; follows SMSP_PORT so it still works when the port is
# changed (e.g. --network host in scripts/image-test.sh). urlopen raises on
# any non-2xx answer or connection error, which exits non-zero.
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:%s/healthcheck' % os.environ.get('SMSP_PORT', '8080'), timeout=4); sys.exit(0 if r.status == 200 else 1)"]

# smsp runs as PID 1 and handles SIGTERM itself (drains, exits 0 within
# SMSP_SHUTDOWN_GRACE). `python -m smsp` runs /app/smsp.py (the working
# directory) as `python smsp.py` would, from the bytecode compiled above.
STOPSIGNAL SIGTERM

CMD ["python", "-m", "smsp"]
