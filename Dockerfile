# syntax=docker/dockerfile:1.7
#
# Two images from one file:
#   docker build --target operator -t ghcr.io/kubetune/operator:0.1.0 .
#   docker build --target trainer  -t ghcr.io/kubetune/trainer:0.1.0 .
# (podman/buildah build the same way: `podman build --target operator ...`.)
#
# `operator` runs `kubetune operator` (kopf, the Kubernetes client; no torch).
# `trainer` runs `kubetune-trainer` in training pods and serves adapters in the
# pods of the `kubetune` runtime (CUDA-capable torch: PyPI's Linux x86_64 torch
# wheel bundles the CUDA libraries, so the base needs no CUDA of its own).
#
# Layers, from the bottom: the base image; a virtualenv at /opt/kubetune; the
# third-party dependencies (they change only with the image's own requirements
# in pyproject.toml, so a source change rebuilds none of torch's gigabytes); the project's own wheel (small,
# rebuilt on every source change). pip's cache is a build cache mount and never
# reaches a layer. The project's wheel (~140 kB) is COPYed in and removed again,
# so it stays in one small layer: COPY is cached by content in every builder,
# while buildah reuses a `RUN --mount=type=bind,from=<stage>` layer after the
# stage it mounts has changed (stale images). Both images run as the non-root
# UID 65532 and work with a read-only root filesystem (HOME included) given a
# writable /tmp (the Helm chart's and the operator's pods mount emptyDirs there;
# training pods also a scratch folder for HF_HOME and TMPDIR).
#
# Build arguments:
#   PYTHON_IMAGE  the base: any Debian-like image with Python 3.11+ (python3 and
#                 its venv module), groupadd and useradd. The default is the public
#                 python slim image; release builds pin it by digest as well, e.g.
#                 python:3.11.11-slim-bookworm@sha256:<digest>
#                 (`docker buildx imagetools inspect python:3.11.11-slim-bookworm`
#                 prints it). The project's tests, where no registry is reachable,
#                 pass a stand-in built from Debian packages (tests/cluster/images.sh).
#
# Build secret (optional): `cacert`, a CA bundle for pip's TLS to the package
# index, for builds behind a TLS-intercepting proxy:
#   docker build --secret id=cacert,src=/etc/ssl/certs/ca-certificates.crt ...
# It is mounted only while pip runs and is never written to a layer.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG KUBETUNE_VERSION=0.1.0
# bitsandbytes: QLoRA loads the base model in 4 bits with it (CUDA only; trainer image only).
ARG BITSANDBYTES_VERSION=0.49.2

# ---------------------------------------------------------------- runtime base
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/kubetune \
    PATH=/opt/kubetune/bin:$PATH
# A passwd entry for 65532: getpass.getuser() (kopf's peer identity, torch's
# cache paths) fails for a UID without one. The virtualenv keeps the project
# apart from the base's own Python packages (and works on bases whose system
# Python is marked externally managed).
RUN groupadd --system --gid 65532 kubetune \
 && useradd --system --uid 65532 --gid 65532 --home-dir /home/kubetune --create-home \
        --shell /usr/sbin/nologin kubetune \
 && python3 -m venv /opt/kubetune
WORKDIR /home/kubetune

# ---------------------------------------------------------------- the project's wheel
FROM runtime AS wheel
COPY pyproject.toml README.md /src/
COPY operator/ /src/operator/
COPY trainer/ /src/trainer/
RUN --mount=type=cache,id=kubetune-pip,target=/root/.cache/pip,sharing=locked \
    --mount=type=secret,id=cacert \
    if [ -f /run/secrets/cacert ]; then export PIP_CERT=/run/secrets/cacert; fi \
 && pip wheel --no-deps --wheel-dir /wheels /src

# ---------------------------------------------------------------- requirements
# Each image's third-party requirements, read from pyproject.toml with tomllib into a file of its own.
# The dependency layers below COPY only that file, so they are rebuilt when an image's requirements
# change, not when anything else in pyproject.toml does (a dev tool, a lint setting, the version).
FROM runtime AS requirements
COPY pyproject.toml /tmp/kubetune/
RUN mkdir /requirements && python -c 'import sys, tomllib; p = tomllib.load(open(sys.argv[1], "rb"))["project"]; [open(f"/requirements/{x}.txt", "w").write("\n".join(p["dependencies"] + p["optional-dependencies"][x]) + "\n") for x in ("operator", "trainer")]' \
        /tmp/kubetune/pyproject.toml

# ---------------------------------------------------------------- operator
FROM runtime AS operator-deps
COPY --from=requirements /requirements/operator.txt /tmp/kubetune/requirements.txt
RUN --mount=type=cache,id=kubetune-pip,target=/root/.cache/pip,sharing=locked \
    --mount=type=secret,id=cacert \
    if [ -f /run/secrets/cacert ]; then export PIP_CERT=/run/secrets/cacert; fi \
 && pip install -r /tmp/kubetune/requirements.txt \
 && rm -rf /tmp/kubetune

FROM operator-deps AS operator
ARG KUBETUNE_VERSION
COPY --from=wheel /wheels/ /tmp/wheels/
# --no-index: every dependency must already be in the layer below.
RUN pip install --no-cache-dir --no-index --find-links /tmp/wheels "kubetune[operator]==${KUBETUNE_VERSION}" \
 && rm -rf /tmp/wheels \
 && kubetune --help >/dev/null
LABEL org.opencontainers.image.title="kubetune-operator" \
      org.opencontainers.image.version="${KUBETUNE_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# Two malloc arenas, not one per thread per core: the operator's threads allocate small, short-lived
# objects, and per-thread arenas kept freed memory resident (RSS) under bursts of events.
ENV MALLOC_ARENA_MAX=2
USER 65532:65532
# 8080: Prometheus /metrics; 8081: /healthz.
EXPOSE 8080 8081
ENTRYPOINT ["kubetune", "operator"]

# ---------------------------------------------------------------- trainer
FROM runtime AS trainer-deps
ARG BITSANDBYTES_VERSION
COPY --from=requirements /requirements/trainer.txt /tmp/kubetune/requirements.txt
RUN --mount=type=cache,id=kubetune-pip,target=/root/.cache/pip,sharing=locked \
    --mount=type=secret,id=cacert \
    if [ -f /run/secrets/cacert ]; then export PIP_CERT=/run/secrets/cacert; fi \
 && pip install -r /tmp/kubetune/requirements.txt "bitsandbytes==${BITSANDBYTES_VERSION}" \
 && rm -rf /tmp/kubetune

FROM trainer-deps AS trainer
ARG KUBETUNE_VERSION
COPY --from=wheel /wheels/ /tmp/wheels/
RUN pip install --no-cache-dir --no-index --find-links /tmp/wheels "kubetune[trainer]==${KUBETUNE_VERSION}" \
 && rm -rf /tmp/wheels \
 && kubetune-trainer --help >/dev/null
LABEL org.opencontainers.image.title="kubetune-trainer" \
      org.opencontainers.image.version="${KUBETUNE_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 65532:65532
ENTRYPOINT ["kubetune-trainer"]
