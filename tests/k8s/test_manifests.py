"""The kustomizations render, validate strictly against a current Kubernetes, and hold the
properties the multi-node launch depends on."""

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from sg2dist.config import load_config

K8S = Path(__file__).resolve().parents[2] / "k8s"

KUSTOMIZATIONS = ["overlays/single-node", "overlays/multi-node", "overlays/prepare", "mlflow"]
TRAIN_OVERLAYS = {"overlays/single-node": (1, 8), "overlays/multi-node": (4, 8)}  # nodes x GPUs
# What launch/sg2dist-launch reads; JOB_COMPLETION_INDEX is Kubernetes' own, set on every pod.
LAUNCH_ENV = [
    "NNODES",
    "GPUS_PER_NODE",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SG2DIST_CONFIG",
    "SG2DIST_SET",
    "SG2DIST_WAIT_S",
    "TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
]
PLACEHOLDER = re.compile(r"^REPLACE-WITH-[A-Z-]+$")


def only(objects: list[dict], kind: str) -> dict:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def env_of(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


def env_value(container: dict, name: str) -> str:
    return env_of(container)[name]["value"]


def trainer(objects: list[dict]) -> dict:
    (container,) = pod_spec(only(objects, "Job"))["containers"]
    return container


def all_pod_specs(render) -> list[tuple[str, dict]]:
    workloads = [
        (f"{name}:{obj['metadata']['name']}", obj)
        for name in KUSTOMIZATIONS
        for obj in render(name)
        if obj["kind"] in ("Job", "Deployment")
    ]
    return [(label, pod_spec(obj)) for label, obj in workloads]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_kustomization_renders_and_every_object_validates_strictly(kustomization, render):
    objects = render(kustomization)
    assert objects
    version = kubernetes_validate.latest_version()
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{kustomization}: {obj['kind']}/{obj['metadata']['name']}: {exc}")


def test_strict_validation_rejects_an_unknown_field(render):
    job = yaml.safe_load(yaml.safe_dump(only(render("overlays/single-node"), "Job")))
    job["spec"]["template"]["spec"]["containers"][0]["gpus"] = 8
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("overlay", TRAIN_OVERLAYS)
def test_headless_service_publishes_not_ready_pods_under_the_job_subdomain(overlay, render):
    objects = render(overlay)
    service, job = only(objects, "Service"), only(objects, "Job")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert pod_spec(job)["subdomain"] == service["metadata"]["name"]
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


@pytest.mark.parametrize("overlay", TRAIN_OVERLAYS)
def test_main_address_is_pod_zero_of_the_job_through_the_service(overlay, render):
    objects = render(overlay)
    job_name = only(objects, "Job")["metadata"]["name"]
    service_name = only(objects, "Service")["metadata"]["name"]
    assert env_value(trainer(objects), "MASTER_ADDR") == f"{job_name}-0.{service_name}"


@pytest.mark.parametrize(("overlay", "shape"), TRAIN_OVERLAYS.items())
def test_indexed_job_runs_one_pod_per_node_with_all_its_gpus(overlay, shape, render):
    nodes, gpus = shape
    job = only(render(overlay), "Job")
    container = trainer(render(overlay))
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == nodes
    assert int(env_value(container, "NNODES")) == nodes
    assert int(env_value(container, "GPUS_PER_NODE")) == gpus
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == gpus


@pytest.mark.parametrize("overlay", TRAIN_OVERLAYS)
def test_job_sets_every_variable_the_launch_script_reads(overlay, render):
    objects = render(overlay)
    env = env_of(trainer(objects))
    assert set(LAUNCH_ENV) <= set(env)
    field = env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert field == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    # SG2DIST_CONFIG names a file of the mounted training-config ConfigMap.
    config_path = Path(env["SG2DIST_CONFIG"]["value"])
    spec = pod_spec(only(objects, "Job"))
    mount = next(
        m for m in trainer(objects)["volumeMounts"] if m["mountPath"] == str(config_path.parent)
    )
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    config_map = next(
        obj
        for obj in objects
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] == volume["configMap"]["name"]
    )
    assert config_path.name in config_map["data"]


@pytest.mark.parametrize("overlay", TRAIN_OVERLAYS)
def test_training_config_loads_and_its_batch_fits_the_overlay(overlay, render, tmp_path):
    objects = render(overlay)
    container = trainer(objects)
    config_text = next(
        obj["data"]["train.yaml"]
        for obj in objects
        if obj["kind"] == "ConfigMap" and "train.yaml" in obj.get("data", {})
    )
    (tmp_path / "train.yaml").write_text(config_text)
    overrides = env_value(container, "SG2DIST_SET").split()
    cfg = load_config(tmp_path / "train.yaml", overrides)
    world_size = int(env_value(container, "NNODES")) * int(env_value(container, "GPUS_PER_NODE"))
    batch_gpu, accumulation = cfg.train.batch_layout(world_size)
    assert batch_gpu * accumulation * world_size == cfg.train.batch
    assert cfg.run.dir.startswith("s3://") and cfg.data.url.startswith("s3://")


@pytest.mark.parametrize("kustomization", ["overlays/multi-node", "overlays/prepare"])
def test_pod_failure_policy_ignores_disruptions_and_fails_the_job_on_exit_code_2(
    kustomization, render
):
    job = only(render(kustomization), "Job")
    assert pod_spec(job)["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] >= 1
    rules = job["spec"]["podFailurePolicy"]["rules"]
    ignore = [r for r in rules if r["action"] == "Ignore"]
    assert {"type": "DisruptionTarget"} in [c for r in ignore for c in r["onPodConditions"]]
    fail = [r for r in rules if r["action"] == "FailJob"]
    assert [r["onExitCodes"]["values"] for r in fail] == [[2]]
    assert fail[0]["onExitCodes"]["operator"] == "In"


@pytest.mark.parametrize("overlay", TRAIN_OVERLAYS)
def test_grace_period_outlasts_the_checkpoint_on_sigterm(overlay, render):
    objects = render(overlay)
    grace_s = pod_spec(only(objects, "Job"))["terminationGracePeriodSeconds"]
    shutdown_s = int(env_value(trainer(objects), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"))
    assert grace_s > shutdown_s >= 300


@pytest.mark.parametrize("overlay", TRAIN_OVERLAYS)
def test_shared_memory_is_a_memory_backed_empty_dir(overlay, render):
    objects = render(overlay)
    mount = next(m for m in trainer(objects)["volumeMounts"] if m["mountPath"] == "/dev/shm")
    volume = next(
        v for v in pod_spec(only(objects, "Job"))["volumes"] if v["name"] == mount["name"]
    )
    assert volume["emptyDir"]["medium"] == "Memory"


def test_every_pod_runs_non_root_read_only_without_privileges(render):
    for label, spec in all_pod_specs(render):
        assert spec["securityContext"]["runAsNonRoot"] is True, label
        assert spec["securityContext"]["runAsUser"] != 0, label
        writable = {
            v["name"] for v in spec["volumes"] if "emptyDir" in v or "persistentVolumeClaim" in v
        }
        for container in spec["containers"] + spec.get("initContainers", []):
            where = f"{label}/{container['name']}"
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in security["capabilities"], where
            assert security["readOnlyRootFilesystem"] is True, where
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts.get("/tmp") in writable, f"{where}: /tmp must be a writable emptyDir"
            assert mounts.get("/home/sg2dist") in writable, f"{where}: HOME must be writable"


def test_secret_template_holds_placeholders_only_and_no_kustomization_applies_a_secret(render):
    template = yaml.safe_load((K8S / "cluster" / "secret.example.yaml").read_text())
    kubernetes_validate.validate(template, kubernetes_validate.latest_version(), strict=True)
    values = {**template.get("stringData", {}), **template.get("data", {})}
    assert set(values) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(PLACEHOLDER.match(value) for value in values.values()), values
    for name in KUSTOMIZATIONS:
        assert all(obj["kind"] != "Secret" for obj in render(name)), name
    # Every pod reads the credentials from that Secret, by name.
    for label, spec in all_pod_specs(render):
        for container in spec["containers"] + spec.get("initContainers", []):
            refs = [src["secretRef"]["name"] for src in container["envFrom"] if "secretRef" in src]
            assert refs == [template["metadata"]["name"]], f"{label}/{container['name']}"


def test_no_file_under_k8s_holds_something_shaped_like_a_credential():
    access_key_id = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
    secret_key = re.compile(r"\b[0-9A-Za-z/+]{40}\b")
    for path in K8S.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert not access_key_id.search(text), path
            assert not secret_key.search(text), path


def test_tracking_uri_is_a_host_the_mlflow_server_allows(render):
    settings = only(render("mlflow"), "ConfigMap")["data"]
    host_port = settings["MLFLOW_TRACKING_URI"].removeprefix("http://")
    (container,) = pod_spec(only(render("mlflow"), "Deployment"))["containers"]
    allowed = next(a for a in container["args"] if a.startswith("--allowed-hosts="))
    assert host_port in allowed.removeprefix("--allowed-hosts=").split(",")
    service = only(render("mlflow"), "Service")
    name, port = host_port.split(":")
    assert service["metadata"]["name"] == name
    assert [p["port"] for p in service["spec"]["ports"]] == [int(port)]


def test_prepare_job_writes_the_dataset_the_training_config_reads(render, tmp_path):
    (container,) = pod_spec(only(render("overlays/prepare"), "Job"))["containers"]
    config_text = (K8S / "base" / "train.yaml").read_text()
    (tmp_path / "train.yaml").write_text(config_text)
    cfg = load_config(tmp_path / "train.yaml")
    assert env_value(container, "DATASET_URL") == cfg.data.url
    assert int(env_value(container, "RESOLUTION")) == cfg.model.resolution
