# visprior in a container. CPU by default; for GPUs build with
#   docker build --build-arg TORCH_SPEC="torch" --build-arg BASE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 -t visprior .
# (with a CUDA base image, install python3.11 + pip first, or use a pytorch/pytorch image as BASE and TORCH_SPEC="").
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
RUN apt-get update && apt-get install -y --no-install-recommends make git && rm -rf /var/lib/apt/lists/*
WORKDIR /workspace/visprior
COPY pyproject.toml README.md ./
COPY visprior ./visprior
RUN if [ -n "$TORCH_SPEC" ]; then pip install --no-cache-dir $TORCH_SPEC; fi \
 && pip install --no-cache-dir -e ".[dev]"
COPY . .
# The main job: a toy recipe end to end on CPU (mount a volume on /workspace/visprior/runs to keep the outputs).
CMD ["python", "-m", "visprior.demo"]
