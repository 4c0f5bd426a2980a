# pacsnode container images, CPU and GPU, from the same stages:
#
#   docker build --target cpu -t pacsnode:cpu .    # default target (the last stage)
#   docker build --target gpu -t pacsnode:gpu .    # TensorFlow with CUDA (NVIDIA GPUs)
#
# Both install the versions pinned in constraints.txt. The GPU image swaps
# tensorflow-cpu for tensorflow[and-cuda] at the same version: its wheels
# bring the CUDA and cuDNN libraries, so the host needs only the NVIDIA
# driver and the NVIDIA Container Toolkit (see docs/operations.md).
# The bundled models inside are for demonstration, not clinical use.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtual environment in /opt/venv --------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY scripts/gpu-requirements ./scripts/
COPY pacsnode ./pacsnode
COPY scp ./scp
COPY workers ./workers
COPY models ./models
COPY db ./db

FROM build AS build-cpu
RUN pip install -c constraints.txt . && pip check

FROM build AS build-gpu
# Requirements and constraints with tensorflow-cpu replaced by
# tensorflow[and-cuda] of the same version; pacsnode itself without its
# declared dependencies (they name tensorflow-cpu).
RUN python scripts/gpu-requirements /tmp/gpu \
 && pip install -c /tmp/gpu/constraints.txt -r /tmp/gpu/requirements.txt \
 && pip install --no-deps .

# --- runtime: the same for both, without build files ---------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    TF_CPP_MIN_LOG_LEVEL=2 \
    PACSNODE_DATA_DIR=/var/lib/pacsnode
# A fixed, non-root uid, so volumes and NFS exports can be given to it.
RUN groupadd --system --gid 10001 pacsnode \
 && useradd --system --uid 10001 --gid pacsnode --home-dir /var/lib/pacsnode \
            --create-home --shell /usr/sbin/nologin pacsnode
WORKDIR /var/lib/pacsnode
EXPOSE 11112 8000
# Database at the newest schema, broker reachable (if configured), and the
# local SCP answering an A-ASSOCIATE-RQ. Workers override it (--no-dicom).
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 \
    CMD ["pacsnode", "healthcheck", "--timeout", "5"]
CMD ["pacsnode", "serve"]

FROM runtime AS gpu
COPY --from=build-gpu /opt/venv /opt/venv
USER pacsnode

FROM runtime AS cpu
COPY --from=build-cpu /opt/venv /opt/venv
USER pacsnode
