"""The image recipe: hadolint-clean, pinned, non-root, entry point = the launch script,
dependencies from the lock, and a build context that lets in nothing but the package."""

import os
import re
import subprocess
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "launch" / "requirements.lock"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def locked_versions() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_dockerfile_passes_hadolint_at_warning_level(hadolint):
    result = subprocess.run(
        [hadolint, "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_an_nvidia_cuda_image_pinned_by_version():
    (base,) = [args for keyword, args in instructions() if keyword == "FROM"]
    assert re.fullmatch(
        r"nvidia/cuda:\d+\.\d+\.\d+-(base|runtime|cudnn-runtime)-ubuntu\d+\.\d+", base
    )


def test_image_runs_as_non_root_with_the_launch_script_as_entry_point():
    steps = instructions()
    user = [args for keyword, args in steps if keyword == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    (entrypoint,) = [args for keyword, args in steps if keyword == "ENTRYPOINT"]
    assert entrypoint == '["/opt/sg2dist/launch/sg2dist-launch"]'
    script = ROOT / "launch" / "sg2dist-launch"
    assert os.access(script, os.X_OK)
    copies = [args.split() for keyword, args in steps if keyword == "COPY"]
    assert ["launch", "/opt/sg2dist/launch"] in copies


def test_dependencies_install_from_the_lock_before_the_source_is_copied():
    steps = instructions()
    lock_copy = steps.index(
        ("COPY", "launch/requirements.lock /opt/sg2dist/launch/requirements.lock")
    )
    lock_install = next(
        i
        for i, (kw, args) in enumerate(steps)
        if kw == "RUN" and "-r /opt/sg2dist/launch/requirements.lock" in args
    )
    source_copy = steps.index(("COPY", "sg2dist /opt/sg2dist/sg2dist"))
    assert lock_copy < lock_install < source_copy


def test_lock_pins_every_runtime_dependency_within_the_declared_ranges():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = locked_versions()
    for text in project["dependencies"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} missing from {LOCK.name}; run launch/lock-requirements"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])
    test_only = {
        canonicalize_name(Requirement(t).name) for t in project["optional-dependencies"]["test"]
    }
    assert not test_only & pins.keys(), "test tools do not belong in the image"


def test_build_context_admits_only_what_the_dockerfile_copies():
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "the .dockerignore must be an allow-list"
    admitted = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    sources = {
        part.split("/")[0]
        for keyword, args in instructions()
        if keyword == "COPY"
        for part in args.split()[:-1]
    }
    assert sources == admitted
    assert {"**/.env", "**/*.pth"} <= set(lines)
