# syntax=docker/dockerfile:1
# ddm-anomaly: image anomaly scoring service.
#
#   GPU (default): docker build -t ddm-anomaly:gpu .
#   CPU:           docker build --build-arg VARIANT=cpu -t ddm-anomaly:cpu .
#
# Both variants share one OS (Ubuntu 22.04 with its python3.11) so the virtual environment built in the
# `build` stage runs unchanged in the `runtime` stage; only the base image and the PyTorch wheel index
# differ. The final stage has no compiler, no pip and no package caches.

ARG VARIANT=gpu
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu22.04
ARG CPU_IMAGE=ubuntu:22.04
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

# ---- OS + Python per variant ----------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS os-gpu
ARG TORCH_CUDA_INDEX
ENV TORCH_INDEX_URL=${TORCH_CUDA_INDEX} \
    DDM_DEVICE=auto

FROM ${CPU_IMAGE} AS os-cpu
ARG TORCH_CPU_INDEX
ENV TORCH_INDEX_URL=${TORCH_CPU_INDEX} \
    DDM_DEVICE=cpu

# hadolint ignore=DL3006
FROM os-${VARIANT} AS os
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Distribution packages follow the pinned base image's snapshot; pinning each version would break on
# every point release of the base.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 \
    && rm -rf /var/lib/apt/lists/*

# ---- build: a self-contained virtual environment in /opt/venv --------------------------------------------
FROM os AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH}
ARG TORCH_VERSION=2.13.0
# torch first, from the PyTorch index of this variant (CUDA or CPU build): the largest layer, cached apart.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
# The pin keeps pip from swapping the variant's torch for another build while resolving the rest.
# Bytecode stays compiled (the runtime root is read-only); pip itself is not needed at run time.
RUN pip install --no-cache-dir . "torch==${TORCH_VERSION}" \
    && python -m pip uninstall -y pip

# ---- runtime ---------------------------------------------------------------------------------------------
FROM os AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="ddm-anomaly" \
      org.opencontainers.image.description="Zero-shot image anomaly scoring with a pretrained diffusion model" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.ddm-anomaly.variant="${VARIANT}"
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
WORKDIR /opt/ddm
# The shipped model; mount a volume over /opt/ddm/model_store (or point DDM_MODEL_DIR elsewhere) for larger
# models and to keep calibration profiles across restarts.
COPY --chown=10001:10001 model_store ./model_store
# Every cache goes under /tmp or ~/.cache so the root filesystem can be mounted read-only.
ENV PATH=/opt/venv/bin:${PATH} \
    HOME=/home/app \
    XDG_CACHE_HOME=/home/app/.cache \
    MPLCONFIGDIR=/home/app/.cache/matplotlib \
    TRITON_CACHE_DIR=/home/app/.cache/triton \
    HF_HOME=/home/app/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    DDM_HOST=0.0.0.0 \
    DDM_PORT=8000 \
    DDM_MODEL_DIR=/opt/ddm/model_store/celeba32-ref \
    DDM_DRAIN_TIMEOUT_S=30
USER 10001:10001
EXPOSE 8000
# Healthy = model loaded and warmed up (/readyz); a slow first load is covered by the start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('DDM_PORT', '8000'), timeout=4)"]
# Exec form: the Python process is PID 1 and receives SIGTERM itself (stop taking work, drain, exit).
ENTRYPOINT ["ddm-anomaly"]
CMD ["serve"]
