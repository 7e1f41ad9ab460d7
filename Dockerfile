# Build stage: wheels for the package and every dependency (binary wheels; no compiler
# reaches the final image).
FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY sidecar ./sidecar
# every version pinned by the same constraints file the Makefile and CI use
RUN pip wheel --no-cache-dir --wheel-dir /wheels -c constraints.txt ".[speed]"

# Runtime stage: the wheels installed offline, a non-root user, nothing else.
FROM python:3.11.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 sidecar \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin sidecar
COPY --from=build /wheels /wheels
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-index --find-links=/wheels latency-sidecar uvloop \
 && rm -rf /wheels
USER 10001:10001
# proxy, admin (metrics, health, stats), profiling (off unless enabled)
EXPOSE 8000 9901 6060
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SIDECAR_ADMIN_LISTEN', ':9901').rsplit(':', 1)[1] + '/healthz', timeout=2)"]
ENTRYPOINT ["latency-sidecar"]
CMD ["run"]
