# syntax=docker/dockerfile:1
# The imagegen image: the project installed from this repository into /opt/venv, run as a non-root user.
# One file, two variants (the base differs; everything after it is shared):
#
#   docker build -t imagegen:cpu .                                  # CPU: python:3.11-slim, CPU torch wheels
#   docker build -t imagegen:cuda --build-arg VARIANT=cuda .        # CUDA: nvidia/cuda runtime, CUDA torch wheels
#
# It runs `imagegen serve` by default; KubeRay (deploy/rayservice.yaml) starts `ray start` in it instead
# (bash, wget and `ray` are on the PATH for that). Models are not baked in: each node pulls them once
# (`imagegen models pull <preset>`) into IMAGEGEN_MODEL_CACHE_DIR, or mounts a shared cache there.

ARG VARIANT=cpu

# -- bases: Python and the torch wheel index of each variant ------------------------------------------------
FROM python:3.11-slim-bookworm AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/venv

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS base-cuda
# the CUDA build of torch matching the base's CUDA (override with --build-arg TORCH_INDEX_URL=...)
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV TORCH_INDEX_URL=${TORCH_INDEX_URL} \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

FROM base-${VARIANT} AS base
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# runtime libraries: OpenCV / dlib / onnxruntime (libgl, libglib, libgomp), wget for KubeRay's probes
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        libgl1 libglib2.0-0 libgomp1 wget ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# -- build: compilers for the packages without wheels (insightface), then the project ------------------------
FROM base AS build
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# torch from the variant's index first (pinned as in pyproject.toml), so `pip install` keeps it
RUN pip install --upgrade pip \
    && pip install --index-url "$TORCH_INDEX_URL" torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY imagegen ./imagegen
COPY configs ./configs
# the project installed from the repository (editable: configs/ stays next to the package, where it is read)
RUN pip install -e ".[postgres]"

# -- runtime: the venv and the project, no compilers ----------------------------------------------------------
FROM base AS runtime
ARG UID=1000
RUN useradd --create-home --uid "${UID}" --shell /bin/bash imagegen \
    && mkdir -p /data \
    && chown imagegen:imagegen /data
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=root:root /app /app
WORKDIR /app
ENV IMAGEGEN_HOME=/data \
    IMAGEGEN_MODEL_CACHE_DIR=/data/models \
    HOME=/home/imagegen
USER imagegen
EXPOSE 8000
CMD ["imagegen", "serve", "--host", "0.0.0.0", "--port", "8000"]
