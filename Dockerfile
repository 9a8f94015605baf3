# syntax=docker/dockerfile:1
# The image that compose.yaml and k8s/ run: the fastapi-coordinator package
# (installed from this checkout) and the demo service (app/, copied beside it:
# the demo is not part of the package) under uvicorn. Build: docker build -t coordinator-demo .

# Build stage: install the package into a virtualenv that the runtime stage copies.
FROM python:3.11.13-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY coordinator ./coordinator
RUN /opt/venv/bin/pip install .

FROM python:3.11.13-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    WEB_CONCURRENCY=2
# A numeric UID, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
WORKDIR /srv
COPY app ./app
USER 10001:10001
EXPOSE 8000
# uvicorn's supervisor passes SIGTERM to its workers; each one releases the
# leader lease (another process leads within milliseconds) and ends its SSE
# streams before exiting.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
# exec: uvicorn replaces the shell and gets the signals itself (PID 1).
CMD ["sh", "-c", "exec uvicorn app.main:app --host 0.0.0.0 --port 8000 --workers \"${WEB_CONCURRENCY:-2}\" --timeout-graceful-shutdown \"${GRACEFUL_SHUTDOWN_S:-20}\""]
