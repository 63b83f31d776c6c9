# The worker image (docker-compose.yml: worker, worker-cpu). One Dockerfile for both, with
# the torch build as an argument: the rest (modelcore, the model extra, gcc) is the same,
# and two files would drift.
#   worker      TORCH_INDEX=https://pypi.org/simple: PyPI's Linux torch wheels are the CUDA
#               build (with its nvidia-* libraries and the triton it names).
#               https://download.pytorch.org/whl/cuNNN picks another CUDA release.
#   worker-cpu  TORCH_INDEX=https://download.pytorch.org/whl/cpu: no CUDA wheels at all.
FROM python:3.11.13-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

# A C compiler: modelcore.native builds its CPU kernels (log_mix) on first use, into
# AGORA_NATIVE_CACHE (docs/modelcore.md); without one the worker runs the numpy path.
RUN apt-get update \
    && apt-get install -y -q --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# torch first and pinned (as the Makefile does); the installed build then constrains every
# later pip run, so the model extra's `torch` requirement cannot replace it.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
    && python -c "import torch; print('torch==' + torch.__version__)" > /etc/pip-torch.txt
ENV PIP_CONSTRAINT=/etc/pip-torch.txt

WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY agora agora
COPY registry registry
COPY migrations migrations
COPY worker worker
COPY modelcore modelcore
# constraints.txt pins triton for the dev machine's kernels extra; the CUDA torch wheel
# names its own triton, so that one line is left out here (the model extra needs no other).
RUN grep -v '^triton==' constraints.txt > /tmp/constraints.txt \
    && pip install -c /etc/pip-torch.txt -c /tmp/constraints.txt '.[model]' \
    && python -c "import torch, modelcore, worker.runner; print('torch', torch.__version__)"

# The same uid as the registry image's: the worker-token one-shot leaves /tokens/worker
# readable by it alone. /cache is the verified download cache and the native kernels.
RUN useradd --system --create-home --uid 10001 agora \
    && mkdir /cache /tokens && chown agora /cache /tokens
USER agora
