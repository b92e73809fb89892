"""Every deploy file parses and validates offline against its schema; Dockerfiles lint clean."""

import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S_VERSION = "1.33.0"
YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_there_are_deploy_files():
    names = {p.relative_to(DEPLOY).as_posix() for p in YAML_FILES}
    assert {"docker/compose.yaml", "k8s/coordinator.yaml", "k8s/workers.yaml", "k8s/kuberay-rayjob.yaml",
            "ray/cluster-aws.yaml", "ray/cluster-local.yaml"} <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} is empty"


@pytest.mark.parametrize("name", ["coordinator.yaml", "workers.yaml"])
def test_kubernetes_manifests_validate(name):
    for doc in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kuberay_pod_templates_validate():
    """RayJob is a CRD with no schema in the core set: validate its pod templates as core PodTemplates."""
    job = yaml.safe_load((DEPLOY / "k8s" / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert "fedmla simulate --address auto" in job["spec"]["entrypoint"]
    spec = job["spec"]["rayClusterSpec"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for i, tpl in enumerate(templates):
        doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"}, "template": tpl}
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_a_broken_manifest_is_caught():
    doc = yaml.safe_load_all((DEPLOY / "k8s" / "coordinator.yaml").read_text())
    deployment = [d for d in doc if d["kind"] == "Deployment"][0]
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name", ["cluster-aws.yaml", "cluster-local.yaml"])
def test_ray_cluster_configs_match_rays_schema(name):
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(yaml.safe_load((DEPLOY / "ray" / name).read_text()))]
    assert errors == []


def test_compose_file_matches_compose_spec():
    exe = shutil.which("check-jsonschema")
    assert exe, "check-jsonschema missing: run `bash deploy/install.sh`"
    r = subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "docker" / "compose.yaml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_lint_clean(name):
    exe = shutil.which("hadolint")
    assert exe, "hadolint missing: run `bash deploy/install.sh`"
    r = subprocess.run([exe, "--config", str(DEPLOY / "docker" / ".hadolint.yaml"), str(DEPLOY / "docker" / name)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
