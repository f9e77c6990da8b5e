# One image for servers and workers; the command picks the role.
#   CPU (default):  docker build -t torch-ps .
#   CUDA workers:   docker build -t torch-ps:cuda \
#                     --build-arg BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime .
#                   (that base already has a CUDA torch, which the install below keeps)
# TORCH_INDEX_URL may name a wheel index of CPU-only torch builds for a smaller image.
# The image carries the built-in digits job (the 'demo' extra) for ps-worker and ps-train;
# your own training script needs neither of its packages.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=""
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY ps_common ./ps_common
COPY ps_server ./ps_server
COPY ps_worker ./ps_worker
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install --index-url "$TORCH_INDEX_URL" "torch>=2.4,<3"; fi \
 && pip install '.[demo]' \
 && useradd --create-home --uid 1000 ps \
 && mkdir -p /checkpoints && chown ps /checkpoints

USER ps
# gRPC and Prometheus metrics.
EXPOSE 50051 9100
# A container is its own host: listen on every interface of it.
ENV PS_HOST=0.0.0.0
CMD ["ps-server"]
