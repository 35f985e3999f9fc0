# telemed-gateway: a sidecar next to the shop. Build: docker build -t telemed-gateway .
# Run:  docker run --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
#         -p 8080:8080 -p 9091:9091 -v $PWD/gateway.toml:/etc/telemed-gateway/gateway.toml:ro \
#         -v $PWD/secrets:/run/secrets:ro -v telemed-outbox:/var/lib/telemed-gateway telemed-gateway

# Build stage: wheels for the project and its dependencies (compilers stay here).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Final stage: no compilers, no build tools, a non-root user with a high UID (it maps to no user
# of the host). The root filesystem can be read-only: the process writes only to /tmp (the
# workers' shared metrics directory) and to /var/lib/telemed-gateway (the outbox's SQLite file).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_CONFIG=/etc/telemed-gateway/gateway.toml
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels telemed-gateway \
    && rm -rf /wheels \
    && groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin gateway \
    && install --directory --owner=10001 --group=10001 --mode=0700 /var/lib/telemed-gateway
USER 10001:10001
# The configuration is mounted here (read-only); secrets come from files under /run/secrets (or
# env vars). The outbox's data lives in /var/lib/telemed-gateway: mount a persistent volume there,
# or the orders queued in it are lost with the container.
VOLUME ["/etc/telemed-gateway", "/var/lib/telemed-gateway"]
EXPOSE 8080 9091
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9091/healthz', timeout=2).status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway"]
CMD ["serve"]
