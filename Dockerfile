# One image for every ARM service. The entry point is `python -m`; the command picks the module:
#   docker run IMAGE arm_registry            (serve)
#   docker run IMAGE arm_registry migrate    (apply Alembic migrations, a separate step)
#   docker run IMAGE arm_registry genkey     (print a fresh API key; nothing stored)
#   docker run IMAGE arm_console             (the web console on :8080; see deploy/README.md)
# It holds the runtime dependencies only (requirements.lock; the test/lint tools are in
# requirements-dev.lock), runs as uid/gid 10001, and works on a read-only root filesystem: mount
# /tmp as a tmpfs and, for arm_allinone, /data as a volume (see deploy/README.md).
#
# Base image pinned by digest: python:3.11.14-slim-bookworm, multi-arch index digest as published
# on Docker Hub. It was looked up offline from public Dockerfiles that pin the same tag (no
# registry is reachable here), so confirm it before a release with
#   docker buildx imagetools inspect python:3.11.14-slim-bookworm
# and bump tag and digest together.
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

# PYTHONPATH: the same folders as SRC_DIRS in the Makefile (a missing one is simply ignored).
# ARM_DATA_DIR: where arm_allinone keeps its SQLite files and dev admin key (writable by `arm`).
# PYTHONDONTWRITEBYTECODE: nothing is written next to the code (it is precompiled below).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app/libs/proto:/app/libs/common:/app/libs/engine:/app/libs/client:/app/libs/cli:/app/services/registry:/app/services/governance:/app/services/telemetry:/app/services/allinone:/app/services/gateway:/app/services/console \
    ARM_LISTEN=0.0.0.0:50051 \
    ARM_CONSOLE_LISTEN=0.0.0.0:8080 \
    ARM_DATA_DIR=/data \
    TMPDIR=/tmp

WORKDIR /app
COPY requirements.lock .
RUN pip install --no-cache-dir --no-compile -r requirements.lock \
 && python -m compileall -q "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

# /data (all-in-one SQLite) and /keys/* (compose's key volumes) belong to `arm`, so volumes
# mounted there start out writable by it.
RUN groupadd --system --gid 10001 arm \
 && useradd --system --uid 10001 --gid arm --no-create-home --home-dir /nonexistent arm \
 && mkdir -p /data /keys/admin /keys/service && chown arm:arm /data /keys/admin /keys/service

COPY libs/ libs/
COPY services/ services/
COPY deploy/grpc_healthcheck.py deploy/grpc_healthcheck.py
RUN python -m compileall -q libs services deploy

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 50051 8080
ENTRYPOINT ["python", "-m"]
