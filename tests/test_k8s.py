"""`medc export k8s`: the manifests parse as YAML and name what a cluster needs (image, ports, probes, GPU limits,
the API key's secret, where the model files come from), for a bundle (KServe) and a Triton repository."""

import json
import re
import shutil

import pytest
import yaml

from medc import __version__
from medc.compile.k8s import write_manifests
from medc.errors import MedcError


def _objects(paths) -> dict:
    """kind -> object, from every YAML file written; each must parse on its own."""
    objects = {}
    for path in paths:
        if path.suffix == ".yaml":
            for doc in yaml.safe_load_all(path.read_text()):
                objects[doc["kind"]] = doc
    return objects


def _readme_yaml(readme: str) -> list:
    """The manifests the README pipes into `kubectl apply -f -`: they must parse too."""
    return [doc for block in re.findall(r"<<'EOF'\n(.*?)\nEOF", readme, re.S) for doc in yaml.safe_load_all(block)]


def _repository(tmp_path, kind: str, name: str = "triton-repo", **changes):
    """A minimal stand-in for what `medc export triton` writes: the file this exporter reads, one model folder."""
    repo = tmp_path / name
    (repo / "medsiglip-tiny.image_encoder" / "1").mkdir(parents=True)
    data = {"format": 1, "kind": kind,
            "models": [{"name": "medsiglip-tiny.image_encoder", "platform": "onnxruntime_onnx"}],
            "triton_release": "25.08", "image": f"medc-triton:{__version__}", **changes}
    (repo / "medc-repository.json").write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
    return repo


def test_bundle_on_kserve_cpu(bundle_fp32, tmp_path):
    out = tmp_path / "k8s"
    paths = write_manifests(bundle_fp32, out)
    assert [p.name for p in paths] == ["01-servingruntime.yaml", "02-inferenceservice.yaml", "README.md"]
    objects = _objects(paths)
    runtime, isvc = objects["ServingRuntime"], objects["InferenceService"]
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert runtime["spec"]["supportedModelFormats"] == [{"name": "medc", "version": "1", "autoSelect": True}]
    assert runtime["spec"]["protocolVersions"] == ["v2"]

    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"
    assert container["image"] == f"medc-serve:{__version__}"
    assert container["command"] + container["args"] == [
        "medc", "serve", "/mnt/models", "--host", "0.0.0.0", "--port", "8080", "--api-key-file", "/var/run/medc/api-key"]
    assert container["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    sec = container["securityContext"]
    assert sec["runAsNonRoot"] and sec["readOnlyRootFilesystem"] and sec["allowPrivilegeEscalation"] is False

    # The API key: Secret medc-api-key's key api-key, a file at the path --api-key-file names.
    volumes = {v["name"]: v for v in runtime["spec"]["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert volumes["api-key"]["secret"]["secretName"] == "medc-api-key"
    assert volumes["api-key"]["secret"]["items"] == [{"key": "api-key", "path": "api-key"}]
    assert mounts["api-key"]["mountPath"] == "/var/run/medc" and mounts["api-key"]["readOnly"]
    # medc's caches (~/.cache/medc) on an emptyDir, the root filesystem being read-only.
    home = {e["name"]: e["value"] for e in container["env"]}["HOME"]
    assert "emptyDir" in volumes["cache"] and mounts["cache"]["mountPath"] == f"{home}/.cache"

    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "medc"
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["storageUri"] == f"pvc://medc-models/{bundle_fp32.name}"
    assert all(o["metadata"]["namespace"] == "default" for o in objects.values())
    # A CPU bundle asks for no GPU anywhere.
    assert not any("nvidia.com/gpu" in p.read_text() for p in paths if p.suffix == ".yaml")

    readme = (out / "README.md").read_text()
    for line in (f"kubectl apply -f {out}/", "kubectl create secret generic medc-api-key",
                 "--from-file=api-key=", f"kubectl cp -n default {bundle_fp32} medc-copy:/data/{bundle_fp32.name}",
                 "/v2/health/ready", "tritonclient.http", "medsiglip-tiny.image_encoder"):
        assert line in readme, line
    assert [d["kind"] for d in _readme_yaml(readme)] == ["PersistentVolumeClaim", "Pod"]


def test_bundle_on_kserve_gpu(bundle_fp32, tmp_path):
    bundle = tmp_path / "medsiglip-cuda"
    shutil.copytree(bundle_fp32, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["target"] = "cuda"  # a GPU target (targets/profiles/cuda.json)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    (bundle / "golden.npz").write_bytes(b"changed")  # hashes no longer match: writing manifests must not check them

    paths = write_manifests(bundle, tmp_path / "k8s", namespace="radiology", image="registry.example/medc-serve:1",
                            storage_uri="oci://registry.example/bundles/medsiglip:1", api_key_secret="site-key")
    objects = _objects(paths)
    runtime, isvc = objects["ServingRuntime"], objects["InferenceService"]
    (container,) = runtime["spec"]["containers"]
    assert container["image"] == "registry.example/medc-serve:1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    model = isvc["spec"]["predictor"]["model"]
    assert model["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert model["storageUri"] == "oci://registry.example/bundles/medsiglip:1"
    assert {v["name"]: v for v in runtime["spec"]["volumes"]}["api-key"]["secret"]["secretName"] == "site-key"
    assert {o["metadata"]["namespace"] for o in objects.values()} == {"radiology"}
    assert "kubectl create secret generic site-key -n radiology" in (tmp_path / "k8s" / "README.md").read_text()

    two = _objects(write_manifests(bundle, tmp_path / "k8s-2", gpus=2))
    assert two["InferenceService"]["spec"]["predictor"]["model"]["resources"]["limits"]["nvidia.com/gpu"] == 2


def test_triton_repository_gpu_from_pvc(tmp_path):
    repo = _repository(tmp_path, "gpu")
    out = tmp_path / "k8s"
    paths = write_manifests(repo, out)
    assert [p.name for p in paths] == ["01-deployment.yaml", "02-service.yaml", "README.md"]
    objects = _objects(paths)
    deployment, service = objects["Deployment"], objects["Service"]
    assert deployment["apiVersion"] == "apps/v1" and service["apiVersion"] == "v1"

    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == f"medc-triton:{__version__}"
    assert container["command"][:5] == ["tritonserver", "--model-repository=/models", "--http-port=8000",
                                        "--grpc-port=8001", "--metrics-port=8002"]
    assert "--strict-readiness=true" in container["command"] and "--exit-on-error=true" in container["command"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live"),
                        ("startupProbe", "/v2/health/live")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]

    # The repository: the PVC's folder named after it, read-only at /models.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "medc-models"
    assert mounts["models"] == {"name": "models", "mountPath": "/models", "readOnly": True, "subPath": repo.name}
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory" and mounts["shm"]["mountPath"] == "/dev/shm"

    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        "http": (8000, "http"), "grpc": (8001, "grpc"), "metrics": (8002, "metrics")}

    readme = (out / "README.md").read_text()
    for line in (f"kubectl apply -f {out}/", f"kubectl cp -n default {repo} medc-copy:/data/{repo.name}",
                 "/v2/health/ready", "tritonclient.http", f"docker build -t medc-triton:{__version__} {repo}"):
        assert line in readme, line
    assert [d["kind"] for d in _readme_yaml(readme)] == ["PersistentVolumeClaim", "Pod"]


def test_triton_repository_cpu_from_image_volume(tmp_path):
    repo = _repository(tmp_path, "cpu")
    paths = write_manifests(repo, tmp_path / "k8s", storage_uri="oci://registry.example/repos/siglip:1",
                            image="registry.example/medc-triton:1")
    deployment = _objects(paths)["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.example/medc-triton:1"
    models = {v["name"]: v for v in pod["volumes"]}["models"]
    assert models["image"]["reference"] == "registry.example/repos/siglip:1"
    assert "Kubernetes 1.31+" in paths[0].read_text()  # image volumes are new: the file says which clusters have them
    assert not any("nvidia.com/gpu" in p.read_text() for p in paths if p.suffix == ".yaml")


def test_bad_sources_and_options(bundle_fp32, tmp_path):
    def refused(match, source, **kw):
        with pytest.raises(MedcError, match=match):
            write_manifests(source, tmp_path / "out", **kw)

    empty = tmp_path / "empty"
    empty.mkdir()
    refused("neither a medc bundle .* nor a Triton model repository", empty)
    refused("neither a medc bundle", tmp_path / "missing")
    refused("lacks 'image'.*medc export triton", _repository(tmp_path, "gpu", "no-image", image=None))
    refused("format 2", _repository(tmp_path, "gpu", "newer", format=2))
    refused("kind is 'tpu'", _repository(tmp_path, "tpu", "tpu"))
    refused("models must be a non-empty list", _repository(tmp_path, "cpu", "no-models", models=[]))
    refused("neither pvc://.* nor oci://", bundle_fp32, storage_uri="s3://bucket/bundle")
    refused("give one", bundle_fp32, pvc="models", storage_uri="oci://registry.example/b:1")
    refused("runs on the CPU only", bundle_fp32, gpus=1)
    refused("cannot be served with 0 GPUs", _repository(tmp_path, "gpu", "zero"), gpus=0)
    refused("namespace 'Radiology' is not a valid Kubernetes name", bundle_fp32, namespace="Radiology")

    # A folder holding other manifests: `kubectl apply -f DIR` would deploy them too.
    other = tmp_path / "other"
    other.mkdir()
    (other / "something.yaml").write_text("kind: ConfigMap\n")
    with pytest.raises(MedcError, match="something.yaml"):
        write_manifests(bundle_fp32, other)
