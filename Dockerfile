# visprior for GPU machines: a CUDA PyTorch base whose torch is kept (pip is constrained to it), the package installed,
# `visprior` as the entry point. Build it where a container engine runs (this repository's CI has none):
#   docker build -t visprior .
#   docker run --gpus all --ipc=host -v "$PWD/data:/workspace/visprior/data" -v "$PWD/runs:/workspace/visprior/runs" \
#     visprior fit --config recipes/_base/stages/sft.yaml --config recipes/_base/trainers/fsdp-bf16.yaml
# Another CUDA or torch: --build-arg BASE=pytorch/pytorch:<tag> (torch >= 2.6 for FSDP2's fully_shard and DCP resharding).
# CPU only: --build-arg BASE=python:3.11-slim --build-arg TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
ARG BASE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE}
ARG TORCH_SPEC=""
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends git make && rm -rf /var/lib/apt/lists/*
WORKDIR /workspace/visprior
# the base image's torch (or TORCH_SPEC's) is pinned, so resolving visprior's dependencies can never swap it for another build
RUN if [ -n "$TORCH_SPEC" ]; then pip install $TORCH_SPEC; fi \
 && python -c "import torch; print(f'torch=={torch.__version__}')" > /etc/visprior-torch-constraint.txt
COPY pyproject.toml README.md ./
COPY visprior ./visprior
RUN pip install --constraint /etc/visprior-torch-constraint.txt -e ".[dev]" && visprior --help > /dev/null
# recipes, docs, tests, benchmarks (.dockerignore keeps .git, .venv, data, runs and checkpoints out)
COPY . .
ENTRYPOINT ["visprior"]
CMD ["--help"]
