# The operator image: the `recupdate` CLI with the operator's dependencies only. It installs the
# project WITHOUT the `workloads` extra, so there is no torch, transformers or Ray in it.
#   docker build -f docker/operator.Dockerfile -t recupdate-operator:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY workloads ./workloads
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
# The wheel pins every dependency (pyproject.toml); no extras: the operator never imports torch.
RUN pip install --no-cache-dir /wheels/recupdate-*.whl \
    && rm -rf /wheels \
    && python -c "import importlib.util as u; assert u.find_spec('torch') is None, 'torch must not be in the operator image'"
# A fixed non-root user (65532, the conventional "nonroot"): the chart runs it with a read-only
# root filesystem and a writable /tmp.
USER 65532:65532
WORKDIR /tmp
# 8080: Prometheus metrics (--metrics-port), 8081: kopf's liveness endpoint (--liveness).
EXPOSE 8080 8081
ENTRYPOINT ["recupdate", "operator"]
