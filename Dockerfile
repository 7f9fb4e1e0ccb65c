# syntax=docker/dockerfile:1
# ddm-anomaly: image anomaly scoring service.
#
#   GPU (default, CUDA 13.0):  docker build -t ddm-anomaly:0.1.0-gpu-cu130 .
#   GPU, legacy CUDA 12.6:     docker build --build-arg CUDA_FLAVOUR=cu126 -t ddm-anomaly:0.1.0-gpu-cu126 .
#   CPU:                       docker build --build-arg VARIANT=cpu -t ddm-anomaly:0.1.0-cpu .
#   With Ray (score-dataset on a Ray cluster, k8s/ray): add --build-arg EXTRAS=bulk and a -bulk tag suffix;
#   the service images above are built without Ray.
#   Build, run and check one:  deploy/image-smoke.sh --variant cpu   (docs/DEPLOYMENT.md)
#
# Both variants share one OS (Ubuntu 22.04 with its python3.11) so the virtual environment built in the
# `build` stage runs unchanged in the `runtime` stage; only the base image and the PyTorch build differ.
# The final stage has no compiler, no pip and no package caches.

ARG VARIANT=gpu
# The torch release, and for VARIANT=gpu the CUDA build of it. Each supported pair is a row of
# deploy/torch-cuda-pairs.toml (PyTorch's published wheels, with sources); tests/test_deploy_docker.py
# holds these defaults and every cuda-* stage below to that table:
#   CUDA_FLAVOUR  torch   wheels                               base image                           GPUs
#   cu130         2.13.0  download.pytorch.org/whl/cu130       nvidia/cuda:13.0.2-base-ubuntu22.04  Turing (sm_75) and newer; driver >= 580 (default)
#   cu126         2.13.0  download.pytorch.org/whl/cu126       nvidia/cuda:12.6.3-base-ubuntu22.04  also Maxwell, Pascal, Volta; driver >= 560 (legacy)
# There is no cu128: PyTorch publishes no CUDA 12.8 wheels from torch 2.12 on. Another flavour needs a
# cuda-<flavour> stage, a row in the table and constraints/<flavour>.txt.
ARG TORCH_VERSION=2.13.0
ARG CUDA_FLAVOUR=cu130
ARG TORCH_INDEX=https://download.pytorch.org/whl
# Optional extras of the package (pyproject.toml): `bulk` adds Ray Data for `ddm-anomaly score-dataset`.
ARG EXTRAS=
# `-base-` images (CUDA runtime stub + the NVIDIA Container Toolkit settings: NVIDIA_VISIBLE_DEVICES,
# NVIDIA_DRIVER_CAPABILITIES, and NVIDIA_REQUIRE_CUDA, which refuses to start on a too-old driver): enough,
# because the pip CUDA wheels that torch depends on carry every CUDA library it loads (cuBLAS, cuDNN, cuFFT,
# NCCL, NVRTC, the runtime), and the service compiles no kernels (no nvcc, no torch.compile). A `-runtime-`
# base would be a second copy of those libraries (several GB); `-devel-` adds the compiler on top.
ARG CUDA130_IMAGE=nvidia/cuda:13.0.2-base-ubuntu22.04
ARG CUDA126_IMAGE=nvidia/cuda:12.6.3-base-ubuntu22.04
ARG CPU_IMAGE=ubuntu:22.04
# OCI image labels; deploy/image-smoke.sh passes REVISION (git commit), CREATED (RFC 3339) and SOURCE.
ARG VERSION=0.1.0
ARG REVISION=
ARG CREATED=
ARG SOURCE=

# ---- OS + Python per variant ----------------------------------------------------------------------------
FROM ${CUDA130_IMAGE} AS cuda-cu130
FROM ${CUDA126_IMAGE} AS cuda-cu126

# An unsupported CUDA_FLAVOUR stops here ("pull access denied for cuda-cu128"): pick one listed above.
# hadolint ignore=DL3006
FROM cuda-${CUDA_FLAVOUR} AS os-gpu
ARG CUDA_FLAVOUR
LABEL io.ddm-anomaly.cuda-flavour="${CUDA_FLAVOUR}"
ENV DDM_DEVICE=auto

FROM ${CPU_IMAGE} AS os-cpu
ENV DDM_DEVICE=cpu

# hadolint ignore=DL3006
FROM os-${VARIANT} AS os
# Build-time only (ARG, not ENV): apt's frontend must not leak into the running container.
ARG DEBIAN_FRONTEND=noninteractive
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Distribution packages follow the pinned base image's snapshot; pinning each version would break on
# every point release of the base.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 \
    && rm -rf /var/lib/apt/lists/*

# ---- build: a self-contained virtual environment in /opt/venv --------------------------------------------
FROM os AS build
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH}
WORKDIR /src
# The same constraints as `make install`: constraints/<flavour>.txt (the torch pin, and for CUDA builds the
# CUDA wheels torch pulls in) and requirements.lock (everything else, shared by both variants).
COPY requirements.lock ./
COPY constraints ./constraints
COPY deploy/check_pins.py ./
ARG VARIANT
ARG CUDA_FLAVOUR
ARG TORCH_VERSION
ARG TORCH_INDEX
# torch first, the largest layer, cached apart from the code: the variant's build from the PyTorch index
# (without dependencies: that index does not carry every pinned version), then its dependencies from PyPI at
# the pinned versions.
RUN if [ "${VARIANT}" = cpu ]; then flavour=cpu; else flavour="${CUDA_FLAVOUR}"; fi \
    && cp "constraints/${flavour}.txt" torch-pins.txt \
    && pip install --no-cache-dir --no-deps --index-url "${TORCH_INDEX}/${flavour}" -c torch-pins.txt \
        "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir -c torch-pins.txt -c requirements.lock "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY app ./app
# The pins keep pip from swapping the variant's torch for another build while resolving the rest; then every
# installed distribution must be pinned (check_pins.py fails the build otherwise: a reproducible image).
# Bytecode stays compiled (the runtime root is read-only); pip itself is not needed at run time.
ARG EXTRAS
RUN pip install --no-cache-dir -c torch-pins.txt -c requirements.lock ".${EXTRAS:+[${EXTRAS}]}" \
    && python check_pins.py torch-pins.txt requirements.lock --ignore ddm-anomaly --ignore pip \
    && python -m pip uninstall -y pip

# ---- runtime ---------------------------------------------------------------------------------------------
FROM os AS runtime
ARG VARIANT
ARG TORCH_VERSION
ARG VERSION
ARG REVISION
ARG CREATED
ARG SOURCE
LABEL org.opencontainers.image.title="ddm-anomaly" \
      org.opencontainers.image.description="Zero-shot image anomaly scoring with a pretrained diffusion model" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}" \
      io.ddm-anomaly.variant="${VARIANT}" \
      io.ddm-anomaly.torch="${TORCH_VERSION}"
# A regular (not --system) account: UID/GID 10001 lie outside the system range, which --system warns about.
# --no-log-init: no sparse lastlog/faillog entries sized by the UID.
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid app --no-log-init --home-dir /home/app --create-home \
        --shell /usr/sbin/nologin app
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
