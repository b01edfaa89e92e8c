# Loom: one image for the API, the workers and the migrate step (entrypoint: the `loom` CLI).
#
# CPU by default. torch is installed first, from TORCH_INDEX_URL when given, so that one build
# argument picks the CPU or a CUDA build (see README.md, "Docker"):
#   docker build -t loom .
#   docker build -t loom-gpu --build-arg TORCH_INDEX_URL=<a CUDA wheel index> .
FROM python:3.11-slim

ARG TORCH="torch==2.13.0"
ARG TORCH_INDEX_URL=""

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LOOM_HOME=/var/lib/loom

WORKDIR /app

RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install "$TORCH" --index-url "$TORCH_INDEX_URL"; \
    else \
        pip install "$TORCH"; \
    fi

# Dependencies first (cached while only the source changes), then the source.
COPY pyproject.toml README.md ./
COPY loom ./loom
COPY pipeline ./pipeline
COPY worker ./worker
COPY api ./api
COPY migrations ./migrations
RUN pip install . \
    && useradd --system --home-dir /var/lib/loom --create-home loom

# migrations/ is found next to the installed loom package's parent; keep the source tree on the
# path so that `loom db upgrade` and `celery -A worker.app` use this copy.
ENV PYTHONPATH=/app
USER loom
EXPOSE 8000
ENTRYPOINT ["loom"]
CMD ["--help"]
