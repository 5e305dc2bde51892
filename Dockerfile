# syntax=docker/dockerfile:1
# One image for the API and the worker; the command decides which runs:
#   docker run IMAGE                                   -> arcdiff serve --host 0.0.0.0 --port 8000
#   docker run --gpus all IMAGE worker --model mnist --device cuda:0 --redis redis://redis:6379/0
#
# The base brings a CUDA build of PyTorch. The project is installed with its extras against a
# constraint that pins torch to the version already in the image, so pip never swaps it for
# another build (it fails instead if a dependency would need a different torch).
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# torch.compile (Triton on CUDA, Inductor on CPU) builds small C launchers at run time: it needs
# a C compiler, which the runtime base image does not have.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/arcdiff

# 1) dependencies only (cached while the sources change): install the project from its metadata
#    with the image's torch pinned, then drop the (empty) project itself.
# (README.md* : the readme pyproject.toml names, copied when present)
COPY pyproject.toml README.md* ./
RUN python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > /opt/arcdiff/torch-constraint.txt \
    && cat /opt/arcdiff/torch-constraint.txt \
    && pip install -c /opt/arcdiff/torch-constraint.txt '.[eval,diffusers]' \
    && pip uninstall -y arcdiff

# 2) the project: the one package arcdiff/ (with the bundled models under arcdiff/model/weights/)
COPY arcdiff ./arcdiff
# the operator's first check on a new GPU host:
#   docker compose run --rm --entrypoint bash worker /opt/arcdiff/deploy/gpu-check.sh
COPY deploy/gpu-check.sh ./deploy/gpu-check.sh
RUN pip install --no-deps -c /opt/arcdiff/torch-constraint.txt '.' \
    && python -c "import torch; assert torch.version.cuda, 'torch lost its CUDA build'; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
    && arcdiff --help > /dev/null

COPY deploy/docker/healthcheck.py /usr/local/bin/arcdiff-healthcheck
RUN chmod 0755 /usr/local/bin/arcdiff-healthcheck

# Non-root user; compile caches live in its home (mount a volume there to keep them across restarts).
# ARCDIFF_MODEL_DIR empty means "the models bundled in the package". To serve other models, mount a
# folder of model folders (NAME/config.json + NAME/model.safetensors) at /models and set
# ARCDIFF_MODEL_DIR=/models.
RUN useradd --create-home --uid 10001 --user-group arcdiff \
    && mkdir -p /models /home/arcdiff/.cache \
    && chown -R arcdiff:arcdiff /models /home/arcdiff/.cache
USER arcdiff
WORKDIR /home/arcdiff
ENV HOME=/home/arcdiff \
    TORCHINDUCTOR_CACHE_DIR=/home/arcdiff/.cache/torchinductor \
    TRITON_CACHE_DIR=/home/arcdiff/.cache/triton \
    ARCDIFF_MODEL_DIR="" \
    ARCDIFF_WORKER_METRICS_PORT=9101

# 8000: API (HTTP + /metrics); 9101: a worker's Prometheus metrics
EXPOSE 8000 9101

HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/usr/local/bin/arcdiff-healthcheck"]

ENTRYPOINT ["arcdiff"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
