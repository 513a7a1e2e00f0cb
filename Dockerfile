# syntax=docker/dockerfile:1.7
#
# Two images from one file:
#   docker build --target operator -t ghcr.io/kubetune/operator:0.1.0 .
#   docker build --target trainer  -t ghcr.io/kubetune/trainer:0.1.0 .
#
# `operator` runs `kubetune operator` (kopf, the Kubernetes client; no torch).
# `trainer` runs `kubetune-trainer` in training pods and serves adapters in the
# pods of the `kubetune` runtime (CUDA-capable torch: PyPI's Linux x86_64 torch
# wheel bundles the CUDA libraries, so the base needs no CUDA of its own).
#
# Builder stages turn the project and every dependency into wheels; the final
# stages install those wheels offline from a bind mount, so no wheel, compiler
# or pip cache ends up in a final layer. Both run as the non-root UID 65532.
#
# Release builds pin the base by digest as well as by tag, e.g.
#   FROM python:3.11.11-slim-bookworm@sha256:<digest>
# (`docker buildx imagetools inspect python:3.11.11-slim-bookworm` prints it).

ARG KUBETUNE_VERSION=0.1.0
# bitsandbytes: QLoRA loads the base model in 4 bits with it (CUDA only; trainer image only).
ARG BITSANDBYTES_VERSION=0.49.2

# ---------------------------------------------------------------- builders
FROM python:3.11.11-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer/ trainer/

# The project's wheel and the wheels of all it needs, one set per image: building
# the operator image never downloads torch.
FROM builder AS operator-wheels
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels ".[operator]"

FROM builder AS trainer-wheels
ARG BITSANDBYTES_VERSION
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels \
        ".[trainer]" "bitsandbytes==${BITSANDBYTES_VERSION}"

# ---------------------------------------------------------------- runtime base
FROM python:3.11.11-slim-bookworm AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A passwd entry for 65532: getpass.getuser() (kopf's peer identity, torch's
# cache paths) fails for a UID without one.
RUN groupadd --system --gid 65532 kubetune \
 && useradd --system --uid 65532 --gid 65532 --home-dir /home/kubetune --create-home \
        --shell /usr/sbin/nologin kubetune
WORKDIR /home/kubetune

# ---------------------------------------------------------------- operator
FROM runtime AS operator
ARG KUBETUNE_VERSION
RUN --mount=type=bind,from=operator-wheels,source=/wheels,target=/wheels \
    python -m pip install --no-cache-dir --no-index --find-links /wheels \
        "kubetune[operator]==${KUBETUNE_VERSION}" \
 && kubetune --help >/dev/null
LABEL org.opencontainers.image.title="kubetune-operator" \
      org.opencontainers.image.version="${KUBETUNE_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 65532:65532
# 8080: Prometheus /metrics; 8081: /healthz.
EXPOSE 8080 8081
ENTRYPOINT ["kubetune", "operator"]

# ---------------------------------------------------------------- trainer
FROM runtime AS trainer
ARG KUBETUNE_VERSION
ARG BITSANDBYTES_VERSION
RUN --mount=type=bind,from=trainer-wheels,source=/wheels,target=/wheels \
    python -m pip install --no-cache-dir --no-index --find-links /wheels \
        "kubetune[trainer]==${KUBETUNE_VERSION}" "bitsandbytes==${BITSANDBYTES_VERSION}" \
 && kubetune-trainer --help >/dev/null
LABEL org.opencontainers.image.title="kubetune-trainer" \
      org.opencontainers.image.version="${KUBETUNE_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 65532:65532
ENTRYPOINT ["kubetune-trainer"]
