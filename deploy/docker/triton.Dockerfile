# syntax=docker/dockerfile:1
#
# NVIDIA Triton Inference Server for the policy service's `triton` backend: NVIDIA's tritonserver image with our
# Python-backend policy models (deploy/triton/model_repository) and the `rlhf` package they import.
#
#   docker build -f deploy/docker/triton.Dockerfile -t rlhf-platform/rlhf-triton:0.1.0 .
#   docker run --gpus all -p 8000-8002:8000-8002 -v "$PWD/out/artifacts:/artifacts" rlhf-platform/rlhf-triton:0.1.0
#
# The policy service loads every version itself (explicit model control: a new model name per version, config and
# model.py sent with the load), so the repository here only has to exist; the weights come from the artifact volume
# at RLHF_MODEL_ROOT (/artifacts), the folder the policy service calls its artifact_root.
#
# Why these pieces (see /work/shared/INFRA-NOTES.md, section Triton):
# * 24.10 is Triton 2.51, the server that deploy/local/triton.py runs in the tests (nvidia-pytriton 0.7.0), so the
#   models are tested against the server they will meet here.
# * The package needs Python 3.11; the image's Python is 3.10. The Python backend runs models in a stub process that
#   embeds the `python3` first on PATH, so the image gets Python 3.11 (Ubuntu 22.04 ships it), a virtual environment
#   with torch, the package and numpy<2 (the 2.51 stub corrupts string tensors under numpy 2), first on PATH, and
#   the backend's stub built for 3.11, taken from the nvidia-pytriton 0.7.0 wheel (built from the same 2.51 sources).

ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --------------------------------------------------------------------------------------------- the package as a wheel
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
RUN pip wheel --no-deps --wheel-dir /wheels .

# --------------------------------------------------------------------------------------------- the server
FROM ${TRITON_IMAGE} AS triton
ARG PYTRITON_VERSION=0.7.0
ARG TORCH_VERSION=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv libpython3.11 \
 && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY --from=wheel /wheels /tmp/wheels
RUN pip install "torch${TORCH_VERSION:+==${TORCH_VERSION}}" \
 && pip install /tmp/wheels/*.whl "numpy<2" \
 && pip check \
 && rm -rf /tmp/wheels
# The Python 3.11 stub of the Python backend, and the libraries it was linked with, from the nvidia-pytriton wheel.
RUN pip download --no-deps --dest /tmp/pytriton "nvidia-pytriton==${PYTRITON_VERSION}" \
 && python3.11 -m zipfile -e /tmp/pytriton/nvidia_pytriton-*.whl /tmp/pytriton/wheel \
 && install -m 0755 /tmp/pytriton/wheel/pytriton/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub \
      /opt/tritonserver/backends/python/triton_python_backend_stub \
 && mkdir -p /opt/rlhf/lib \
 && cp -a /tmp/pytriton/wheel/nvidia_pytriton.libs/. /opt/rlhf/lib/ \
 && rm -rf /tmp/pytriton
COPY deploy/triton/model_repository /opt/rlhf/triton/model_repository
RUN groupadd --system --gid 10001 rlhf \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/rlhf --create-home --shell /usr/sbin/nologin rlhf \
 && mkdir -p /artifacts && chown 10001:10001 /artifacts
# Last on the search path: the stub's own libraries carry hashed names, so they never shadow the server's.
ENV LD_LIBRARY_PATH=${LD_LIBRARY_PATH}:/opt/rlhf/lib \
    RLHF_MODEL_ROOT=/artifacts \
    HOME=/home/rlhf \
    XDG_CACHE_HOME=/tmp/cache \
    HF_HOME=/tmp/cache/huggingface \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
EXPOSE 8000 8001 8002
CMD ["tritonserver", "--model-repository=/opt/rlhf/triton/model_repository", "--model-control-mode=explicit", \
     "--strict-readiness=false", "--allow-metrics=true", "--exit-timeout-secs=30"]
