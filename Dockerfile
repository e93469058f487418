# visprior in a container. torch is installed first, from TORCH_SPEC, so the rest never picks another build:
#   docker build -t visprior .                                           # torch 2.13.0 from the default index
#   docker build --build-arg TORCH_SPEC="torch==2.13.0 --index-url <your CPU wheel index>" -t visprior .   # a smaller CPU image
#   docker build --build-arg BASE=<a pytorch image with CUDA> --build-arg TORCH_SPEC="" -t visprior .     # GPUs: keep its torch
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG TORCH_SPEC="torch==2.13.0"
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
