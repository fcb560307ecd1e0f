"""Kubernetes manifests for a medc bundle or a Triton model repository (`medc export k8s SOURCE -o DIR`).

Two sources, two standard ways to serve on a cluster; medc grows no cluster machinery of its own:

- a **bundle** (`medc build`, has manifest.json) is served by `medc serve` as a KServe custom serving runtime: a
  `ServingRuntime` (the medc-serve container, speaking the Open Inference Protocol, "v2") and an `InferenceService`
  that points it at the bundle (`storageUri`, pvc:// or oci://). KServe mounts the bundle at /mnt/models.
- a **Triton model repository** (`medc export triton`, has medc-repository.json) is served by NVIDIA Triton: a
  `Deployment` (tritonserver on the repository mounted at /models) and a ClusterIP `Service` for its three ports.

Both get probes on the V2 health routes, `nvidia.com/gpu` limits when the source is for a GPU, and locked-down
containers: non-root, no privilege escalation, a read-only root filesystem with emptyDirs where medc and Triton write.
One YAML file per object, plus a README.md in DIR that says how to create the secret, fill the volume, apply and query.
Only plain data is written: nothing here talks to a cluster.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from medc import __version__
from medc.errors import MedcError
from medc.manifest import MANIFEST_NAME, Manifest
from medc.targets import get_target

REPOSITORY_FILE = "medc-repository.json"  # written by `medc export triton` at the repository's root
REPOSITORY_FORMAT = 1
DEFAULT_PVC = "medc-models"

SERVE_PORT = 8080  # KServe's convention for a runtime's HTTP port (Knative routes to the one containerPort)
MODEL_DIR = "/mnt/models"  # where KServe mounts storageUri in the kserve-container
API_KEY_DIR = "/var/run/medc"
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
TRITON_MODELS = "/models"

# Both images run as this non-root user: Triton's NGC images ship `triton-server` as uid 1000, and a medc-serve image
# needs no user of its own. HOME is set explicitly because an image's passwd may not know the uid; medc's caches
# (TensorRT EP engines, ~/.cache/medc) then land on an emptyDir under it.
UID = 1000
HOME = "/home/medc"

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")


@dataclass(frozen=True)
class K8sOptions:
    """What the caller chooses; everything else follows from the source."""

    namespace: str = "default"
    image: str | None = None  # default: medc-serve:<medc version> (bundle), the repository's "image" (Triton)
    pvc: str | None = None  # the PersistentVolumeClaim holding bundles/repositories (default medc-models)
    storage_uri: str | None = None  # pvc://CLAIM/PATH or oci://IMAGE; default pvc://<pvc>/<source folder name>
    gpus: int | None = None  # None: 1 for a GPU source, 0 for a CPU one
    api_key_secret: str = "medc-api-key"  # Secret with key "api-key", mounted as medc serve's --api-key-file


@dataclass(frozen=True)
class Storage:
    """Where the served files come from: a folder of a PVC, or an OCI image."""

    uri: str  # as KServe's storageUri spells it
    claim: str | None = None
    path: str = ""  # inside the claim; "" is the whole volume
    reference: str | None = None  # the image, for oci://


@dataclass(frozen=True)
class Repository:
    """medc-repository.json: what `medc export triton` says about the repository it wrote."""

    kind: str  # "gpu" | "cpu"
    models: tuple[tuple[str, str], ...]  # (name, platform)
    triton_release: str  # the NGC tritonserver release the repository's Dockerfile builds on, "25.08"
    image: str  # the image that Dockerfile builds: Triton with medc added (for the Python-backend models)


def write_manifests(source: Path, out: Path, *, namespace: str = "default", image: str | None = None,
                    pvc: str | None = None, storage_uri: str | None = None, gpus: int | None = None,
                    api_key_secret: str = "medc-api-key") -> list[Path]:
    """Write the manifests serving `source` (a bundle or a Triton repository) into `out`; returns the files written,
    YAML first, README.md last."""
    source, out = Path(source), Path(out)
    opts = _checked(K8sOptions(namespace=namespace, image=image, pvc=pvc, storage_uri=storage_uri, gpus=gpus,
                                api_key_secret=api_key_secret))
    # The repository test comes first: a Triton repository carries its bundles' manifests too.
    if (source / REPOSITORY_FILE).is_file():
        repo = read_repository(source)
        gpus = _gpu_count(opts.gpus, repo.kind == "gpu", f"repository kind {repo.kind!r}")
        objects, readme = _triton(source, out, repo, opts, gpus)
    elif (source / MANIFEST_NAME).is_file():
        manifest = Manifest.read(source)  # parsed only: hashes are checked where the bundle runs, not here
        target = get_target(manifest.target)
        gpus = _gpu_count(opts.gpus, target.kind == "gpu", f"target {target.name}")
        objects, readme = _kserve(source, out, manifest, target, opts, gpus)
    else:
        raise MedcError(f"{source} is neither a medc bundle ({MANIFEST_NAME}) nor a Triton model repository from "
                        f"`medc export triton` ({REPOSITORY_FILE}). Pass a bundle (`medc build MODEL -o DIR`) or a "
                        "repository (`medc export triton BUNDLE -o REPO`).")
    return _write(out, objects, readme)


# -- options and the repository file -----------------------------------------------------------------------------------
def _checked(opts: K8sOptions) -> K8sOptions:
    """Refuse names Kubernetes would refuse, here, with the fix, rather than at `kubectl apply`."""
    _dns(opts.namespace, "namespace", _DNS_LABEL)
    _dns(opts.api_key_secret, "API key secret name", _DNS_SUBDOMAIN)
    if opts.pvc is not None:
        _dns(opts.pvc, "PVC name", _DNS_SUBDOMAIN)
    if opts.gpus is not None and (isinstance(opts.gpus, bool) or not isinstance(opts.gpus, int) or opts.gpus < 0):
        raise MedcError(f"gpus must be a whole number of GPUs, 0 or more; got {opts.gpus!r}.")
    if opts.storage_uri and opts.pvc:
        raise MedcError(f"both a PVC ({opts.pvc}) and a storage URI ({opts.storage_uri}) say where the model "
                        "files are; give one (pvc://CLAIM/PATH names a PVC too).")
    if opts.image is not None and not opts.image.strip():
        raise MedcError("the image name is empty; give an image reference (REGISTRY/NAME:TAG) or leave it out.")
    return opts


def _dns(name: str, what: str, pattern: re.Pattern) -> None:
    if not (isinstance(name, str) and len(name) <= (63 if pattern is _DNS_LABEL else 253) and pattern.fullmatch(name)):
        raise MedcError(f"{what} {name!r} is not a valid Kubernetes name: use lower-case letters, digits and '-' "
                        "(at most 63 characters), starting and ending with a letter or digit.")


def _gpu_count(asked: int | None, gpu_source: bool, what: str) -> int:
    """GPUs to ask the scheduler for. A GPU source gets 1 unless told otherwise; a CPU source never asks for one,
    since its graphs would not use it and the GPU would sit idle."""
    if asked is None:
        return 1 if gpu_source else 0
    if gpu_source and asked == 0:
        raise MedcError(f"{what} runs on a GPU and cannot be served with 0 GPUs; ask for 1 or more, or export a "
                        "bundle built for the cpu target.")
    if not gpu_source and asked > 0:
        raise MedcError(f"{what} runs on the CPU only, so {asked} GPU(s) would sit idle; leave gpus out, or export a "
                        "bundle built for a GPU target (`medc targets`).")
    return asked


def read_repository(repo: Path) -> Repository:
    """Parse medc-repository.json, naming the missing or wrong key and the fix."""
    path = Path(repo) / REPOSITORY_FILE
    fix = "re-export the repository with `medc export triton BUNDLE -o REPO`."
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MedcError(f"{path} is unreadable or not JSON ({type(e).__name__}); {fix}") from None
    if not isinstance(data, dict):
        raise MedcError(f"{path} is not a JSON object; {fix}")
    if data.get("format") != REPOSITORY_FORMAT:
        raise MedcError(f"{path} has format {data.get('format')!r}; this medc reads format {REPOSITORY_FORMAT}: "
                        f"{fix}")
    for key in ("kind", "models", "triton_release", "image"):
        if key not in data:
            raise MedcError(f"{path} lacks {key!r}; {fix}")
    if data["kind"] not in ("gpu", "cpu"):
        raise MedcError(f"{path}: kind is {data['kind']!r}, not 'gpu' or 'cpu'; {fix}")
    models = data["models"]
    if (not isinstance(models, list) or not models
            or not all(isinstance(m, dict) and isinstance(m.get("name"), str) and isinstance(m.get("platform"), str)
                       for m in models)):
        raise MedcError(f"{path}: models must be a non-empty list of {{\"name\", \"platform\"}} objects; {fix}")
    for key in ("triton_release", "image"):
        if not isinstance(data[key], str) or not data[key].strip():
            raise MedcError(f"{path}: {key} must be a non-empty string; {fix}")
    return Repository(kind=data["kind"], models=tuple((m["name"], m["platform"]) for m in models),
                      triton_release=data["triton_release"], image=data["image"])


def _storage(opts: K8sOptions, folder: str) -> Storage:
    """pvc://CLAIM[/PATH] or oci://IMAGE; by default the source's folder name inside the PVC (the README's copy step
    puts it there)."""
    uri = opts.storage_uri or f"pvc://{opts.pvc or DEFAULT_PVC}/{folder}"
    if uri.startswith("pvc://"):
        claim, _, path = uri[len("pvc://"):].partition("/")
        _dns(claim, f"PVC name in {uri}", _DNS_SUBDOMAIN)
        if ".." in path.split("/"):
            raise MedcError(f"{uri}: the path inside the PVC may not contain '..'; name the folder directly.")
        return Storage(uri=uri, claim=claim, path=path.strip("/"))
    if uri.startswith("oci://") and len(uri) > len("oci://"):
        return Storage(uri=uri, reference=uri[len("oci://"):])
    raise MedcError(f"storage URI {uri!r} is neither pvc://CLAIM/PATH (a folder of a PersistentVolumeClaim) nor "
                    "oci://REGISTRY/IMAGE:TAG (the files packed as an OCI image); give one of those.")


def _name(folder: str) -> str:
    """An object name from a folder name: a DNS-1035 label (a Service's rule, the strictest met here), short enough
    for the suffixes KServe and Knative add ("-predictor-00001-deployment-...")."""
    slug = re.sub(r"[^a-z0-9]+", "-", folder.lower()).strip("-")
    if not slug or not slug[0].isalpha():
        slug = f"medc-{slug}".rstrip("-")
    return slug[:40].rstrip("-")


# -- pieces shared by both servers -------------------------------------------------------------------------------------
def _security() -> dict:
    """A container that cannot become root or write its image: what restricted Pod Security admission asks."""
    return {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def _scratch() -> tuple[list[dict], list[dict]]:
    """(volumes, mounts) for what may be written under a read-only root: /tmp (Python's tempfile) and
    ~/.cache (medc's caches, ~/.cache/medc). Both are per pod and start empty."""
    volumes = [{"name": "tmp", "emptyDir": {}}, {"name": "cache", "emptyDir": {}}]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "cache", "mountPath": f"{HOME}/.cache"}]
    return volumes, mounts


def _http_probe(path: str, port: int | str, period: int, failures: int) -> dict:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "timeoutSeconds": 5,
            "failureThreshold": failures}


def _gpu_resources(gpus: int) -> dict:
    """Extended resources are limits only: the request defaults to the limit, and GPUs are never overcommitted."""
    return {"limits": {"nvidia.com/gpu": gpus}} if gpus else {}


def _labels(name: str, component: str) -> dict:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/component": component,
            "app.kubernetes.io/part-of": "medc", "app.kubernetes.io/managed-by": f"medc-{__version__}"}


# -- a bundle on KServe ------------------------------------------------------------------------------------------------
def _kserve(bundle: Path, out: Path, manifest: Manifest, target, opts: K8sOptions, gpus: int) -> tuple[list, str]:
    name = _name(bundle.name)
    runtime = f"{name}-runtime"  # one runtime per export: applying or deleting one export never changes another
    image = opts.image or f"medc-serve:{__version__}"
    storage = _storage(opts, bundle.name)
    scratch_volumes, scratch_mounts = _scratch()
    key_file = f"{API_KEY_DIR}/api-key"
    container = {
        "name": "kserve-container",  # the name KServe merges the InferenceService's settings into
        "image": image,
        "command": ["medc"],  # set, so an image's ENTRYPOINT cannot change what runs
        "args": ["serve", MODEL_DIR, "--host", "0.0.0.0", "--port", str(SERVE_PORT), "--api-key-file", key_file],
        "env": [{"name": "HOME", "value": HOME}],
        "ports": [{"containerPort": SERVE_PORT, "protocol": "TCP"}],
        # medc serve loads every bundle before it listens, so liveness must outlast a slow load (ONNX Runtime
        # sessions, TensorRT engines): 30 x 10 s. No startupProbe: Knative (KServe's Serverless mode) refuses one
        # before Knative 1.15. The kubelet sends no API key, so both routes answer without one.
        "readinessProbe": _http_probe("/v2/health/ready", SERVE_PORT, period=10, failures=3),
        "livenessProbe": {**_http_probe("/v2/health/live", SERVE_PORT, period=10, failures=30),
                          "initialDelaySeconds": 10},
        "securityContext": _security(),
        "volumeMounts": [{"name": "api-key", "mountPath": API_KEY_DIR, "readOnly": True}, *scratch_mounts],
    }
    if gpus:
        container["resources"] = _gpu_resources(gpus)
    serving_runtime = {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "ServingRuntime",
        "metadata": {"name": runtime, "namespace": opts.namespace, "labels": _labels(name, "serving-runtime")},
        "spec": {
            "supportedModelFormats": [{"name": "medc", "version": "1", "autoSelect": True}],
            "protocolVersions": ["v2"],
            "containers": [container],
            "volumes": [
                # 0444: a ServingRuntime has no pod securityContext, so no fsGroup can give the non-root user the
                # file; it is readable inside this one container only, which runs nothing but medc.
                {"name": "api-key", "secret": {"secretName": opts.api_key_secret, "defaultMode": 0o444,
                                               "items": [{"key": "api-key", "path": "api-key"}]}},
                *scratch_volumes,
            ],
        },
    }
    model = {"modelFormat": {"name": "medc", "version": "1"}, "runtime": runtime, "protocolVersion": "v2",
             "storageUri": storage.uri}
    if gpus:
        model["resources"] = _gpu_resources(gpus)
    inference_service = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name, "namespace": opts.namespace, "labels": _labels(name, "inference-service")},
        "spec": {"predictor": {"model": model}},
    }
    where = ("KServe mounts the PVC folder read-only at /mnt/models." if storage.claim else
             "oci:// is a KServe modelcar: the bundle at /models in that image; it needs enableModelcar in the "
             "storage-initializer section of KServe's inferenceservice-config ConfigMap.")
    objects = [
        ("servingruntime", serving_runtime,
         [f"medc serve as a KServe serving runtime (Open Inference Protocol v2), image {image}.",
          f"The API key comes from Secret {opts.api_key_secret} (key api-key); see README.md. Its defaultMode 292 is",
          "0444: a ServingRuntime has no pod securityContext, so no fsGroup can hand the file to the non-root user."]),
        ("inferenceservice", inference_service,
         [f"{manifest.model.get('name', bundle.name)} (target {target.name}) from {storage.uri}.", where]),
    ]
    return objects, _kserve_readme(bundle, out, manifest, target, opts, name, storage, image, gpus)


# -- a Triton repository as a Deployment + Service ---------------------------------------------------------------------
def _triton(repo_dir: Path, out: Path, repo: Repository, opts: K8sOptions, gpus: int) -> tuple[list, str]:
    name = _name(repo_dir.name)
    image = opts.image or repo.image
    storage = _storage(opts, repo_dir.name)
    labels = _labels(name, "triton")
    selector = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "triton"}
    if storage.claim:
        models_volume = {"name": "models", "persistentVolumeClaim": {"claimName": storage.claim, "readOnly": True}}
        models_mount = {"name": "models", "mountPath": TRITON_MODELS, "readOnly": True}
        if storage.path:
            models_mount["subPath"] = storage.path
    else:
        # Kubernetes 1.31+ image volumes (the ImageVolume feature gate: alpha in 1.31, beta from 1.33): the
        # repository, packed as an OCI image or artifact, mounted read-only without copying it into a volume first.
        models_volume = {"name": "models", "image": {"reference": storage.reference, "pullPolicy": "IfNotPresent"}}
        models_mount = {"name": "models", "mountPath": TRITON_MODELS, "readOnly": True}
    scratch_volumes, scratch_mounts = _scratch()
    container = {
        "name": "triton",
        "image": image,
        "command": ["tritonserver", f"--model-repository={TRITON_MODELS}",
                    f"--http-port={TRITON_PORTS['http']}", f"--grpc-port={TRITON_PORTS['grpc']}",
                    f"--metrics-port={TRITON_PORTS['metrics']}",
                    # ready only once every model is, and a model that fails to load stops the server: a pod that
                    # serves part of the repository is restarted and shows why, rather than taking traffic.
                    "--strict-readiness=true", "--exit-on-error=true"],
        "env": [{"name": "HOME", "value": HOME}],
        "ports": [{"name": port, "containerPort": number, "protocol": "TCP"} for port, number in TRITON_PORTS.items()],
        # Loading models (TensorRT plans, MedGemma through medc in the Python backend) can take minutes: the startup
        # probe gives it 60 x 10 s, and liveness and readiness start only after it.
        "startupProbe": _http_probe("/v2/health/live", "http", period=10, failures=60),
        "readinessProbe": _http_probe("/v2/health/ready", "http", period=10, failures=3),
        "livenessProbe": _http_probe("/v2/health/live", "http", period=15, failures=4),
        "securityContext": _security(),
        "volumeMounts": [models_mount, *scratch_mounts, {"name": "shm", "mountPath": "/dev/shm"}],
    }
    if gpus:
        container["resources"] = _gpu_resources(gpus)
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": opts.namespace, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": dict(selector)},
            "template": {
                "metadata": {"labels": dict(labels)},  # copies: PyYAML would write a shared dict as an alias
                "spec": {
                    "automountServiceAccountToken": False,  # Triton never calls the Kubernetes API
                    # No fsGroup: medc writes repositories readable by all, and an fsGroup would have the kubelet
                    # walk and chown the whole model volume at every mount.
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [container],
                    "volumes": [
                        models_volume, *scratch_volumes,
                        # The Python backend moves tensors through shared memory; a pod's /dev/shm is 64 MiB unless
                        # a memory-backed emptyDir replaces it.
                        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": opts.namespace, "labels": dict(labels)},
        "spec": {"type": "ClusterIP", "selector": selector,
                 "ports": [{"name": port, "port": number, "targetPort": port, "protocol": "TCP"}
                           for port, number in TRITON_PORTS.items()]},
    }
    objects = [
        ("deployment", deployment,
         [f"NVIDIA Triton {repo.triton_release} with medc ({image}) on the model repository {repo_dir.name}.",
          f"Models: {', '.join(n for n, _ in repo.models)}; repository from {storage.uri}.",
          *(["The repository is an image volume: Kubernetes 1.31+ with the ImageVolume feature gate (alpha in 1.31,",
             "beta from 1.33); on older clusters, copy it into a PVC instead (README.md)."] if storage.reference
            else [])]),
        ("service", service, ["Triton's HTTP (8000), gRPC (8001) and metrics (8002) ports, inside the cluster."]),
    ]
    return objects, _triton_readme(repo_dir, out, repo, opts, name, storage, image, gpus)


# -- writing -----------------------------------------------------------------------------------------------------------
def _write(out: Path, objects: list[tuple[str, dict, list[str]]], readme: str) -> list[Path]:
    """One file per object, numbered in apply order (`kubectl apply -f DIR` reads a folder's files sorted by name)."""
    import yaml  # PyYAML comes with the build extra (huggingface_hub, transformers)

    names = [f"{i:02d}-{kind}.yaml" for i, (kind, _, _) in enumerate(objects, 1)]
    out.mkdir(parents=True, exist_ok=True)
    # `kubectl apply -f DIR` applies every manifest there: refuse a folder holding others, e.g. an earlier export of
    # the other kind, rather than deploy them too.
    stale = sorted(p.name for p in out.iterdir() if p.suffix in (".yaml", ".yml", ".json") and p.name not in names)
    if stale:
        raise MedcError(f"{out} already holds other manifests ({', '.join(stale)}), which `kubectl apply -f {out}` "
                        "would apply too; write to an empty folder or remove them.")
    written = []
    for file, (_, obj, notes) in zip(names, objects):
        header = "".join(f"# {line}\n" for line in [f"Written by medc {__version__} (`medc export k8s`).", *notes])
        path = out / file
        path.write_text(header + yaml.safe_dump(obj, sort_keys=False, default_flow_style=False))
        written.append(path)
    readme_path = out / "README.md"
    readme_path.write_text(readme)
    return written + [readme_path]


# -- README.md ---------------------------------------------------------------------------------------------------------
def _size_gib(folder: Path) -> int:
    """A PVC size that holds the folder with room to spare (whole GiB, at least 1). A file hard-linked twice (a
    Triton repository links its bundles' files) counts once, as tar copies it once."""
    stats = {(st.st_dev, st.st_ino): st.st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink()
             for st in [p.stat()]}
    total = sum(stats.values())
    return max(1, -(-int(total * 1.25) // 2**30))


def _fill_volume(folder: Path, opts: K8sOptions, storage: Storage) -> str:
    """The README's steps that put `folder` where `storage` points."""
    ns = opts.namespace
    if storage.reference:
        return (f"The files come from the OCI image `{storage.reference}`: push it before applying (see above); no "
                "volume to fill.\n")
    dest = f"/data/{storage.path}" if storage.path else "/data"
    return f"""Create the PersistentVolumeClaim `{storage.claim}` if it does not exist yet, and copy the files into it
with a short-lived helper pod (ReadOnlyMany or ReadWriteMany where the storage class offers it, for replicas on
several nodes):

```sh
kubectl get pvc {storage.claim} -n {ns} >/dev/null 2>&1 || kubectl apply -n {ns} -f - <<'EOF'
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: {storage.claim}}}
spec:
  accessModes: [ReadWriteOnce]
  resources: {{requests: {{storage: {_size_gib(folder)}Gi}}}}
EOF
kubectl apply -n {ns} -f - <<'EOF'
apiVersion: v1
kind: Pod
metadata: {{name: medc-copy}}
spec:
  securityContext: {{runAsNonRoot: true, runAsUser: {UID}, fsGroup: {UID}, seccompProfile: {{type: RuntimeDefault}}}}
  containers:
  - name: copy
    image: busybox:1.36
    command: [sleep, "3600"]
    securityContext: {{allowPrivilegeEscalation: false, capabilities: {{drop: [ALL]}}}}
    volumeMounts: [{{name: data, mountPath: /data}}]
  volumes:
  - {{name: data, persistentVolumeClaim: {{claimName: {storage.claim}}}}}
EOF
kubectl wait -n {ns} --for=condition=Ready pod/medc-copy
kubectl cp -n {ns} {folder} medc-copy:{dest}
kubectl delete -n {ns} pod/medc-copy   # a ReadWriteOnce volume is then free for the server's node
```

The helper runs as the servers' user (uid {UID}); fsGroup makes the new volume writable to it (a volume that ignores
fsGroup, such as NFS, needs its folder made writable to uid {UID} by its administrator).
"""


def _kserve_readme(bundle: Path, out: Path, manifest: Manifest, target, opts: K8sOptions, name: str,
                   storage: Storage, image: str, gpus: int) -> str:
    ns = opts.namespace
    model_id = manifest.model.get("name", bundle.name)
    # The V2 (Open Inference Protocol) models are the encoder components, named {model id}.{component}.
    v2_models = [f"{model_id}.{c}" for c in manifest.components if c.endswith("_encoder")]
    example = v2_models[0] if v2_models else f"{model_id}.COMPONENT"
    extras = "gpu,serve" if gpus else "cpu,serve"
    engines = ""
    if target.engine == "tensorrt":
        engines = (f"\nThis bundle is for TensorRT target {target.name}: build its engines first, on a node with that "
                   f"GPU (`medc engines {bundle.name} --target {target.name}`), then copy the finished bundle; the "
                   "volume is mounted read-only.\n")
    gpu_line = (f"It asks for {gpus} GPU(s) (`nvidia.com/gpu`): the cluster needs NVIDIA's device plugin or GPU "
                "Operator, and GPU nodes that are tainted need a toleration added to the ServingRuntime."
                if gpus else "It runs on CPU nodes (the bundle's target is the CPU).")
    return f"""# {name}: medc serve on KServe

Written by medc {__version__} (`medc export k8s`) for the bundle `{bundle.name}` ({model_id}, target
{target.name}). `medc serve` runs as a KServe custom serving runtime speaking the Open Inference Protocol (V2) beside
its OpenAI-compatible routes. {gpu_line}

- `01-servingruntime.yaml`: the ServingRuntime `{name}-runtime`, image `{image}`, port {SERVE_PORT}, readiness on
  /v2/health/ready and liveness on /v2/health/live; non-root, read-only root filesystem, emptyDirs for /tmp and
  ~/.cache (medc's caches).
- `02-inferenceservice.yaml`: the InferenceService `{name}` (model format `medc`), storageUri `{storage.uri}`.

## 1. The image

`{image}` is any image with `pip install "medc[{extras}]"` and no ENTRYPOINT of its own, for example:

```Dockerfile
FROM python:3.11-slim
RUN pip install --no-cache-dir "medc[{extras}]=={__version__}"
USER {UID}
```

Push it where the cluster pulls from, and pass that name (`--image`) if it is not `{image}`.
{engines}
## 2. The API key

medc serve reads its API key from the Secret `{opts.api_key_secret}` (key `api-key`, at least 16 characters):

```sh
openssl rand -hex 32 > api-key
kubectl create secret generic {opts.api_key_secret} -n {ns} --from-file=api-key=./api-key
```

## 3. The bundle

{_fill_volume(bundle, opts, storage)}
## 4. Apply

```sh
kubectl apply -f {out}/   # this folder
kubectl get inferenceservice {name} -n {ns}   # READY True once the bundle is loaded
```

## 5. Query

The health routes answer without the key; everything else needs `Authorization: Bearer KEY`. From your machine:

```sh
kubectl port-forward -n {ns} \\
  "$(kubectl get pod -n {ns} -l serving.kserve.io/inferenceservice={name} -o name | head -n 1)" 8080:{SERVE_PORT}
curl -s localhost:8080/v2/health/ready -o /dev/null -w '%{{http_code}}\\n'   # 200 when ready
curl -s -H "Authorization: Bearer $(cat api-key)" localhost:8080/v2/models/{example}
```

The V2 models are `{"`, `".join(v2_models) or "MODEL.COMPONENT"}`. With NVIDIA's client
(`pip install "tritonclient[http]"`), as against Triton:

```python
import tritonclient.http as httpclient

client = httpclient.InferenceServerClient("localhost:8080")
auth = {{"Authorization": "Bearer " + open("api-key").read().strip()}}
print(client.is_server_ready(headers=auth))
print(client.get_model_metadata("{example}", headers=auth))
```

Inside the cluster, use the InferenceService's URL (`kubectl get inferenceservice {name} -n {ns} -o
jsonpath='{{.status.url}}'`) with the same paths.
"""


def _triton_readme(repo_dir: Path, out: Path, repo: Repository, opts: K8sOptions, name: str, storage: Storage,
                   image: str, gpus: int) -> str:
    ns = opts.namespace
    example = repo.models[0][0]
    oci = ""
    if storage.reference:
        oci = f"""
The repository is mounted from the OCI image `{storage.reference}` as an image volume (Kubernetes 1.31+, the
ImageVolume feature gate; beta from 1.33). Pack it with the repository at the image's root, for example:

```sh
printf 'FROM scratch\\nCOPY . /\\n' | docker build -f - -t {storage.reference} {repo_dir}
docker push {storage.reference}
```
"""
    gpu_line = (f"It asks for {gpus} GPU(s) (`nvidia.com/gpu`): the cluster needs NVIDIA's device plugin or GPU "
                "Operator, and GPU nodes that are tainted need a toleration added to the Deployment."
                if gpus else "It runs on CPU nodes (the repository's kind is cpu).")
    return f"""# {name}: NVIDIA Triton on Kubernetes

Written by medc {__version__} (`medc export k8s`) for the Triton model repository `{repo_dir.name}` (models:
{", ".join(f"{n} ({p})" for n, p in repo.models)}). {gpu_line}

- `01-deployment.yaml`: tritonserver (Triton {repo.triton_release}), image `{image}`, the repository read-only at
  {TRITON_MODELS}; ready only when every model is (`--strict-readiness`), a startup probe for slow model loads;
  non-root, read-only root filesystem, emptyDirs for /tmp, ~/.cache and /dev/shm.
- `02-service.yaml`: the ClusterIP Service `{name}`: http 8000, grpc 8001, metrics 8002.

## 1. The image

`{image}` is built from the repository's Dockerfile, which adds medc to `nvcr.io/nvidia/tritonserver`:

```sh
docker build -t {image} {repo_dir} && docker push {image}
```

Push it where the cluster pulls from, and pass that name (`--image`) if it is not `{image}`.
{oci}
## 2. The repository

{_fill_volume(repo_dir, opts, storage)}
## 3. Apply

```sh
kubectl apply -f {out}/   # this folder
kubectl rollout status -n {ns} deployment/{name}
```

tritonserver runs here without authentication: the Service is ClusterIP, reachable inside the cluster only. Put
an authenticating gateway in front of it before exposing it further.

## 4. Query

```sh
kubectl port-forward -n {ns} service/{name} 8000:8000 8001:8001
curl -s localhost:8000/v2/health/ready -o /dev/null -w '%{{http_code}}\\n'   # 200 when every model is ready
curl -s localhost:8000/v2/models/{example}
```

With NVIDIA's client (`pip install "tritonclient[http]"`):

```python
import tritonclient.http as httpclient

client = httpclient.InferenceServerClient("localhost:8000")
print(client.is_server_ready())
print(client.get_model_metadata("{example}"))
```

Inside the cluster the address is `{name}.{ns}.svc.cluster.local:8000` (gRPC 8001, Prometheus metrics 8002).
"""
