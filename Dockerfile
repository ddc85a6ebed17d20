# One image for every ARM service. The entry point is `python -m`; the command picks the module:
#   docker run IMAGE arm_registry            (serve)
#   docker run IMAGE arm_registry migrate    (apply Alembic migrations, a separate step)
FROM python:3.11-slim

# PYTHONPATH: the same folders as SRC_DIRS in the Makefile (a missing one is simply ignored).
# ARM_DATA_DIR: where arm_allinone keeps its SQLite files and dev admin key (writable by `arm`).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app/libs/proto:/app/libs/common:/app/libs/client:/app/services/registry:/app/services/governance:/app/services/telemetry:/app/services/allinone \
    ARM_LISTEN=0.0.0.0:50051 \
    ARM_DATA_DIR=/data

WORKDIR /app
COPY requirements.lock .
RUN pip install --no-cache-dir -r requirements.lock

RUN groupadd --system --gid 10001 arm \
 && useradd --system --uid 10001 --gid arm --no-create-home --home-dir /nonexistent arm \
 && mkdir -p /data /keys/admin /keys/service && chown arm:arm /data /keys/admin /keys/service

COPY libs/ libs/
COPY services/ services/
COPY deploy/grpc_healthcheck.py deploy/grpc_healthcheck.py

USER arm
EXPOSE 50051
ENTRYPOINT ["python", "-m"]
