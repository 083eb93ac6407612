# The workloads image: what runs inside Ray (fine-tune, refresh, bulk inference, Serve), started by
# KubeRay as `python -m recupdate_workloads.<finetune|refresh> --config ... --run-id ...`.
#
#   CPU:  docker build -f docker/workloads.Dockerfile \
#           --build-arg TORCH_INDEX_URL=<PyTorch's own wheel index> -t recupdate-workloads:0.1.0 .
#   CUDA: docker build -f docker/workloads.Dockerfile --build-arg TORCH_VARIANT=cu128 \
#           --build-arg TORCH_INDEX_URL=<PyTorch's own wheel index> -t recupdate-workloads:0.1.0-cu128 .
#
# torch comes from PyTorch's wheel index at <TORCH_INDEX_URL>/<TORCH_VARIANT> (cpu, cu126, cu128, ...).
# Without TORCH_INDEX_URL, pip's configured index is used, whose Linux torch wheel is the CUDA build.
# Use a GPU base (e.g. RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu) for CUDA variants.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311
FROM ${RAY_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, pinned, from the variant's index: `.[workloads]` below then finds it satisfied.
RUN if [ -n "${TORCH_INDEX_URL}" ]; then \
        pip install --no-cache-dir --index-url "${TORCH_INDEX_URL%/}/${TORCH_VARIANT}" "torch==${TORCH_VERSION}"; \
    else \
        pip install --no-cache-dir "torch==${TORCH_VERSION}"; \
    fi

# The image's own user (ray, uid 1000, group users): the project is installed as that user,
# into the image's Python environment, and the image never switches to root.
WORKDIR /home/ray/recupdate
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 operator ./operator
COPY --chown=1000:100 workloads ./workloads
# Every dependency of the extra is pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[workloads]" \
    && python -c "import torch, recupdate_workloads; print('torch', torch.__version__)"
WORKDIR /home/ray
USER 1000:100
