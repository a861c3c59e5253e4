# sg2dist training image: CUDA, Python 3.12, sg2dist and its locked dependencies.
#
#   docker build -t REGISTRY/sg2dist:0.1.0 .
#   docker run --gpus all -e SG2DIST_CONFIG=/opt/sg2dist/configs/quickstart.yaml REGISTRY/sg2dist:0.1.0
#
# The entry point is launch/sg2dist-launch: it reads NNODES, GPUS_PER_NODE, NODE_RANK (or
# JOB_COMPLETION_INDEX), MASTER_ADDR, MASTER_PORT, SG2DIST_CONFIG and SG2DIST_SET and runs
# `accelerate launch ... -m sg2dist train` on this machine's GPUs. Other subcommands:
# `docker run --entrypoint sg2dist IMAGE prepare ...`.
#
# Nothing secret or large is baked in: S3 credentials, endpoints and MLFLOW_TRACKING_URI come
# from the environment at run time (on Kubernetes a Secret and a ConfigMap), datasets from S3.
# .dockerignore lets only the package, launch/ and configs/ into the build context.
#
# Offline clusters: FID needs torch-fidelity's Inception weights, which cannot be downloaded
# at run time there. Bake them into an image derived from this one. Put
# weights-inception-2015-12-05-6726825d.pth (95,628,359 bytes, sha256 6726825d0af5f729...)
# into an empty folder with this two-line Dockerfile and build it from that folder:
#   FROM REGISTRY/sg2dist:0.1.0
#   COPY weights-inception-2015-12-05-6726825d.pth /opt/sg2dist/weights/
# then train with --set metrics.inception_weights=/opt/sg2dist/weights/weights-inception-2015-12-05-6726825d.pth
# (or upload the file to S3 once and set metrics.inception_weights to its s3:// URL).

# The PyPI torch wheels in the lock bring their own CUDA 13.2 libraries (nvidia-* pins), so
# the small `base` flavour is enough: the CUDA runtime plus the NVIDIA_* settings the
# container toolkit reads to mount the host driver (R580 or newer).
FROM nvidia/cuda:13.2.0-base-ubuntu24.04

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12=3.12.3-* python3.12-venv=3.12.3-* \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
RUN python3.12 -m venv /opt/venv

# Dependencies alone in one layer: it is rebuilt only when the lock changes (torch and the
# CUDA wheels are most of the image). Regenerate the lock with launch/lock-requirements.
COPY launch/requirements.lock /opt/sg2dist/launch/requirements.lock
RUN pip install --no-cache-dir -r /opt/sg2dist/launch/requirements.lock

# The package itself: small layers that change with every commit. The lock already holds
# setuptools, so the build needs nothing beyond it.
COPY pyproject.toml README.md /opt/sg2dist/
COPY sg2dist /opt/sg2dist/sg2dist
RUN pip install --no-cache-dir --no-deps --no-build-isolation /opt/sg2dist
COPY launch /opt/sg2dist/launch
COPY configs /opt/sg2dist/configs

# Non-root at run time. Kubernetes mounts writable emptyDirs on /tmp and the home folder
# (caches) and keeps the root filesystem read-only.
RUN useradd --no-log-init --uid 10001 --user-group --create-home --home-dir /home/sg2dist \
    --shell /usr/sbin/nologin sg2dist
ENV HOME=/home/sg2dist \
    XDG_CACHE_HOME=/home/sg2dist/.cache \
    MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
WORKDIR /home/sg2dist

ENTRYPOINT ["/opt/sg2dist/launch/sg2dist-launch"]
