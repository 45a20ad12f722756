# ModelBridge gateway for operators: runs against external PostgreSQL and Redis given by env
# (MODELBRIDGE_DATABASE_URL, MODELBRIDGE_REDIS_URL). See docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MODELBRIDGE_DATA_DIR=/var/lib/modelbridge

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY policies ./policies
RUN pip install . \
    && groupadd --system --gid 10001 modelbridge \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /var/lib/modelbridge \
        --shell /usr/sbin/nologin modelbridge
COPY config.yaml /etc/modelbridge/config.yaml

# Numeric, so that Kubernetes' runAsNonRoot can verify it (deploy/kubernetes runs as 10001).
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/readyz').status == 200 else 1)"
# The embedded stores are for laptops; in a container both URLs must be set.
CMD ["sh", "-c", ": \"${MODELBRIDGE_DATABASE_URL:?set MODELBRIDGE_DATABASE_URL}\" \"${MODELBRIDGE_REDIS_URL:?set MODELBRIDGE_REDIS_URL}\" && exec modelbridge serve --config /etc/modelbridge/config.yaml --host 0.0.0.0 --port 8080"]
