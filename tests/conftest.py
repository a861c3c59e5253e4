"""Shared pytest fixtures: real services live in tests/support/ and are imported here."""

import os

import pytest
from support.datasets import digits_url, metrics_dataset  # noqa: F401
from support.https_server import https_server  # noqa: F401
from support.inception import inception_weights  # noqa: F401
from support.lpips import lpips_weights  # noqa: F401
from support.mlflow_server import mlflow_server  # noqa: F401
from support.s3 import s3_env, s3_server  # noqa: F401


@pytest.fixture(autouse=True)
def environment_of_its_own():
    """Each test ends with the environment it started with.

    Library code run in the pytest process sets variables for its own process on purpose
    (make_accelerator: the NCCL watchdog and flight recorder settings; the tracker: MLflow's
    HTTP retries; the bench: CUDA_VISIBLE_DEVICES). Left behind, they reach every process a
    later test starts, from its first instruction. With TORCH_FR_BUFFER_SIZE and
    TORCH_FR_DUMP_ON_TIMEOUT set at start, 7 of 124 two-process worker runs were killed by
    SIGABRT at exit. The cause, found later, was gloo threads that outlived the process group
    (see make_accelerator); with that fixed, the same variables at start aborted 0 of 50.
    """
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)
