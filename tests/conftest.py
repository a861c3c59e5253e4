"""Shared pytest fixtures: real services live in tests/support/ and are imported here."""

from support.datasets import digits_url, metrics_dataset  # noqa: F401
from support.https_server import https_server  # noqa: F401
from support.inception import inception_weights  # noqa: F401
from support.lpips import lpips_weights  # noqa: F401
from support.mlflow_server import mlflow_server  # noqa: F401
from support.s3 import s3_env, s3_server  # noqa: F401
