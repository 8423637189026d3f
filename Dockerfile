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
# SMSP_SHUTDOWN_GRACE).
STOPSIGNAL SIGTERM

CMD ["python", "smsp.py"]
