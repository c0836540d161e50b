# Portolan API / worker image: multi-stage, runs as a non-root user, serves with uvicorn.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY app ./app
RUN pip install -c constraints.txt .

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PORTOLAN_ENV=production
RUN useradd --system --uid 10001 --home-dir /srv --shell /usr/sbin/nologin portolan
COPY --from=build /opt/venv /opt/venv
WORKDIR /srv
COPY --chown=portolan:portolan alembic.ini ./
COPY --chown=portolan:portolan migrations ./migrations
USER portolan
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"
# The API process runs uvicorn; the worker runs as its own service (`portolan worker`).
CMD ["portolan", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker"]
