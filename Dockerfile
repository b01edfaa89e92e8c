# Loom: one image for the API, the workers and the migrate step (entrypoint: the `loom` CLI).
#
# CPU by default. torch is installed first, so that build arguments pick its build:
#   docker build -t loom .                                            # torch from PyPI
#   docker build -t loom-gpu --build-arg TORCH_INDEX_URL=<a CUDA wheel index> .
# A torch wheel placed in deploy/wheels/ is used instead of any index (no multi-GB download;
# the compose smoke test puts the CPU wheel this machine's pip resolves there). BASE_IMAGE swaps
# the base for one with python3 and python3-venv (the smoke test builds one from debootstrap).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH="torch==2.13.0"
ARG TORCH_INDEX_URL=""
# Optional extras for workers that bring their own model: --build-arg EXTRAS="[hf,diffusers]"
# (transformers and diffusers; Qwen2-VL and SmolVLM also need the torchvision of TORCH).
ARG EXTRAS=""

# A virtual environment: a Debian base's own Python refuses `pip install` (PEP 668).
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    LOOM_HOME=/var/lib/loom

WORKDIR /app

COPY deploy/wheels/ /tmp/wheels/
RUN python3 -m venv /opt/venv \
    && if ls /tmp/wheels/torch-*.whl >/dev/null 2>&1; then \
        pip install --no-deps --no-index --find-links /tmp/wheels "$TORCH" \
        && pip install "$TORCH"; \
    elif [ -n "$TORCH_INDEX_URL" ]; then \
        pip install "$TORCH" --index-url "$TORCH_INDEX_URL"; \
    else \
        pip install "$TORCH"; \
    fi \
    && rm -rf /tmp/wheels

# Dependencies first (cached while only the source changes), then the source.
COPY pyproject.toml README.md ./
COPY loom ./loom
COPY pipeline ./pipeline
COPY worker ./worker
COPY api ./api
COPY migrations ./migrations
RUN pip install ".${EXTRAS}" \
    && useradd --system --home-dir /var/lib/loom --create-home loom

# migrations/ is found next to the installed loom package's parent; keep the source tree on the
# path so that `loom db upgrade` and `celery -A worker.app` use this copy.
ENV PYTHONPATH=/app
USER loom
EXPOSE 8000
ENTRYPOINT ["loom"]
CMD ["--help"]
