"""The Kubernetes manifests in deploy/k8s/, checked without a cluster.

- Every manifest is valid Kubernetes: each rendered resource against the API's own schemas, strictly (unknown
  fields fail), with `kubernetes-validate` (the schemas ship inside the package: no network).
- Both deployments, deploy/k8s/ (GPU workers) and deploy/k8s/cpu-workers/, are rendered here the way kustomize
  renders them (the few transformations the kustomizations use); where `kubectl` is installed, `kubectl
  kustomize` must render exactly the same resources.
- Cross-checks between the manifests, the images (docker/), the settings (service/settings.py) and the
  service's code, each a `check_*` function: the last test breaks one manifest property at a time and
  asserts that the check meant to catch it fails.
"""

from __future__ import annotations

import ast
import copy
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock
from urllib.parse import urlsplit

import kubernetes_validate  # the test extra: Kubernetes' API schemas, offline
import pytest
import yaml
from pydantic import ValidationError

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = {"gpu": K8S, "cpu": K8S / "cpu-workers"}
SECRET_EXAMPLE = K8S / "api-keys-secret.yaml.example"
DOC = ROOT / "docs" / "kubernetes.md"
# the oldest Kubernetes the manifests are for, and the newest whose schemas the installed package ships
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
REDIS_UID = 999  # the redis image's user (`adduser -S -G redis -u 999 redis` in its Dockerfile)
CLUSTER_SCOPED = {"Namespace"}
POD_OWNERS = {"Deployment", "StatefulSet"}


# ---------------------------------------------------------------------------------------------------------------
# reading the manifests, the images and the code


def load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def render(directory: Path) -> list[dict]:
    """What `kubectl kustomize DIRECTORY` renders, for the kustomization features deploy/k8s/ uses."""
    k = load_documents(directory / "kustomization.yaml")[0]
    unknown = set(k) - {"apiVersion", "kind", "namespace", "resources", "images", "patches"}
    assert not unknown, f"{directory}/kustomization.yaml uses {sorted(unknown)}: teach render() in {__file__} them"
    docs: list[dict] = []
    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        docs += render(path) if path.is_dir() else load_documents(path)
    if "namespace" in k:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = k["namespace"]
    for image in k.get("images", []):
        for doc in docs:
            for container in pod_spec(doc).get("containers", []) if doc["kind"] in POD_OWNERS else []:
                repo, _, tag = container["image"].rpartition(":") if ":" in container["image"] else (
                    container["image"], "", "")
                if image["name"] in (container["image"], repo):
                    repo, tag = image.get("newName", repo), image.get("newTag", tag)
                    container["image"] = f"{repo}:{tag}" if tag else repo
    for patch in k.get("patches", []):
        target = patch["target"]
        matched = [d for d in docs if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]]
        assert len(matched) == 1, f"{directory}: patch target {target} matches {len(matched)} resources"
        for op in yaml.safe_load(patch["patch"]):
            json_patch(matched[0], op)
    return docs


def json_patch(doc: dict, op: dict) -> None:
    """One RFC 6902 operation: add, remove or replace."""
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
    node = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key = int(last) if isinstance(node, list) else last
    if op["op"] == "remove":
        del node[key]
    elif op["op"] in ("add", "replace"):
        assert op["op"] == "add" or key in node or isinstance(node, list), f"replace of a missing {op['path']}"
        node[key] = op["value"]
    else:
        raise AssertionError(f"render() does not know the patch operation {op['op']!r}")


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def dockerfile(name: str) -> str:
    return (ROOT / "docker" / name).read_text()


def dockerfile_env(name: str) -> dict[str, str]:
    """The ENV the image sets: what a container has before the manifest adds its own."""
    text = dockerfile(name).replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(pair.split("=", 1) for pair in shlex.split(line[4:]))
    return env


def dockerfile_uid(name: str) -> int:
    (uid,) = re.findall(r"^USER (\d+)$", dockerfile(name), re.M)
    return int(uid)


def image_dockerfiles() -> dict[str, str]:
    """{tag: Dockerfile}: the tags each Dockerfile says it is built as (`docker build -f docker/X -t TAG .`)."""
    tags = {}
    for name in ("Dockerfile", "Dockerfile.cuda"):
        (tag,) = re.findall(rf"docker build -f docker/{re.escape(name)} -t (\S+) \.", dockerfile(name))
        tags[tag] = name
    return tags


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def worker_http_routes() -> set[str]:
    """The paths `loragen worker` serves: the `@app.get(...)` routes inside service.queue.run_worker."""
    tree = ast.parse((ROOT / "service" / "queue.py").read_text())
    (run_worker,) = [n for n in ast.walk(tree) if isinstance(n, ast.AsyncFunctionDef) and n.name == "run_worker"]
    return {d.args[0].value for n in ast.walk(run_worker) if isinstance(n, ast.AsyncFunctionDef)
            for d in n.decorator_list if isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute)
            and d.func.attr == "get"}


def api_http_routes() -> set[str]:
    from service.routes.ops import router

    return {route.path for route in router.routes}


def stream_read_block_s() -> float:
    """How long a worker's stream read blocks (StreamWorker's block_ms default): SIGTERM waits for it."""
    tree = ast.parse((ROOT / "service" / "queue.py").read_text())
    (init,) = [n for cls in ast.walk(tree) if isinstance(cls, ast.ClassDef) and cls.name == "StreamWorker"
               for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"]
    args = init.args
    for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        if arg.arg == "block_ms":
            return default.value / 1000
    raise AssertionError("StreamWorker.__init__ has no block_ms: update stream_read_block_s()")


# ---------------------------------------------------------------------------------------------------------------
# the rendered deployment, with lookups


@dataclass(frozen=True)
class SecretRef:
    name: str
    key: str
    optional: bool


@dataclass
class Manifests:
    docs: list[dict]

    def of_kind(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        found = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
        return found[0]

    @property
    def workloads(self) -> list[dict]:
        return [d for d in self.docs if d["kind"] in POD_OWNERS]

    def selected(self, selector: dict[str, str]) -> list[dict]:
        """The workloads whose pods carry every label of the selector."""
        return [w for w in self.workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]

    def loragen(self, command: str) -> tuple[dict, dict]:
        """(workload, container) of the loragen image running `serve` or `worker`."""
        found = [(w, c) for w in self.workloads for c in pod_spec(w)["containers"]
                 if c["image"] in image_dockerfiles() and (c.get("args") or ["serve"])[0] == command]
        assert len(found) == 1, (f"expected one workload running `loragen {command}` on an image docker/ builds "
                                 f"({', '.join(image_dockerfiles())}), found {len(found)}")
        return found[0]

    def redis(self) -> list[tuple[dict, dict]]:
        image = compose()["services"]["redis"]["image"]
        return [(w, c) for w in self.workloads for c in pod_spec(w)["containers"] if c["image"] == image]

    def env(self, container: dict, with_image: bool = True) -> dict[str, object]:
        """The container's environment: the image's ENV, then envFrom ConfigMaps, then env (later wins)."""
        out: dict[str, object] = dict(dockerfile_env(image_dockerfiles()[container["image"]])) if (
            with_image and container["image"] in image_dockerfiles()) else {}
        for source in container.get("envFrom", []):
            assert "configMapRef" in source, f"envFrom {source}: only ConfigMaps are expected"
            out.update(self.get("ConfigMap", source["configMapRef"]["name"]).get("data", {}))
        for var in container.get("env", []):
            ref = var.get("valueFrom", {})
            if "secretKeyRef" in ref:
                s = ref["secretKeyRef"]
                out[var["name"]] = SecretRef(s["name"], s["key"], s.get("optional", False))
            else:
                out[var["name"]] = var.get("value", ref or "")
        return out

    def settings(self, container: dict, command: str) -> Settings:
        """The Settings the container's process builds from its environment (as `loragen COMMAND` does)."""
        env = {k: ("k8s-test-key" if isinstance(v, SecretRef) else v) for k, v in self.env(container).items()
               if k.startswith("LORAGEN_")}
        if command == "worker":
            env.setdefault("LORAGEN_PORT", "8001")  # service/cli.py: a worker's own default, below the env
        with mock.patch.dict(os.environ):
            for key in [k for k in os.environ if k.startswith("LORAGEN_")]:
                del os.environ[key]
            os.environ.update({k: str(v) for k, v in env.items()})
            try:
                return Settings()
            except ValidationError as e:
                raise AssertionError(f"{container['name']}: the service would refuse its settings: {e}") from None

    def redis_args(self, container: dict) -> dict[str, str]:
        args = container.get("args", [])
        assert args[:1] == ["redis-server"], f"redis container args {args}: expected redis-server --option value ..."
        options = args[1:]
        return {options[i].removeprefix("--"): options[i + 1] for i in range(0, len(options), 2)}

    def service_for_url(self, url: str) -> dict:
        """The Service a redis:// URL names, by its DNS name, whose port the URL uses."""
        parts = urlsplit(url)
        assert parts.scheme in ("redis", "rediss"), url
        host = parts.hostname or ""
        for svc in self.of_kind("Service"):
            name, ns = svc["metadata"]["name"], svc["metadata"].get("namespace", "")
            names = {name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"}
            if host in names:
                assert (parts.port or 6379) in [p["port"] for p in svc["spec"]["ports"]], (
                    f"{url}: Service {name} has no port {parts.port or 6379}")
                return svc
        raise AssertionError(f"{url}: no Service here is named {host}")


def container_port(workload: dict, port: int | str) -> int:
    """A probe's or a Service's port, by number or name, as one the pod's containers declare."""
    ports = [p for c in pod_spec(workload)["containers"] for p in c.get("ports", [])]
    for p in ports:
        if port in (p["containerPort"], p.get("name")):
            return p["containerPort"]
    raise AssertionError(f"{workload['metadata']['name']}: no container port {port!r} among {ports}")


def quantity_bytes(q: str | int) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(q))
    assert m and m.group(2) in {"", *units}, f"memory quantity {q!r}"
    return float(m.group(1)) * units.get(m.group(2), 1)


def redis_bytes(value: str) -> float:
    """Redis's memory units: 1k = 1000, 1kb = 1024, and so on (redis.conf)."""
    units = {"k": 1e3, "kb": 2**10, "m": 1e6, "mb": 2**20, "g": 1e9, "gb": 2**30}
    m = re.fullmatch(r"(\d+)([a-z]*)", value.lower())
    assert m and m.group(2) in {"", *units}, f"redis memory {value!r}"
    return int(m.group(1)) * units.get(m.group(2), 1)


# ---------------------------------------------------------------------------------------------------------------
# the cross-checks: each raises AssertionError naming what is wrong


def check_env_names(m: Manifests) -> None:
    """Every LORAGEN_* variable is a setting, every value one the settings accept, and Kubernetes injects none."""
    settings = Settings.model_fields
    for name in [k for cm in m.of_kind("ConfigMap") for k in cm.get("data", {})] + [
            v["name"] for w in m.workloads for c in pod_spec(w)["containers"] for v in c.get("env", [])]:
        if name.startswith("LORAGEN_"):
            assert name.removeprefix("LORAGEN_").lower() in settings, f"{name} is not a setting (service/settings.py)"
    for command in ("serve", "worker"):
        workload, container = m.loragen(command)
        m.settings(container, command)  # a value the service would refuse at start fails here
    for w in m.workloads:
        # {SERVICE}_PORT=tcp://...: a Service named `loragen` would set LORAGEN_PORT to a URL
        assert pod_spec(w).get("enableServiceLinks") is False, f"{w['metadata']['name']}: enableServiceLinks: false"
    for svc in m.of_kind("Service"):
        base = re.sub(r"\W", "_", svc["metadata"]["name"]).upper()
        injected = [f"{base}_SERVICE_HOST", f"{base}_SERVICE_PORT", f"{base}_PORT"] + [
            f"{base}_PORT_{p['port']}_TCP{s}" for p in svc["spec"]["ports"] for s in ("", "_PROTO", "_PORT", "_ADDR")]
        clash = [v for v in injected if v.startswith("LORAGEN_") and v.removeprefix("LORAGEN_").lower() in settings]
        assert not clash, f"Service {svc['metadata']['name']} would set {clash} in pods with service links"


def check_shared_settings(m: Manifests) -> None:
    """API nodes and workers load the same checkpoints, compute alike and meet in the same two Redis."""
    (_, api), (_, worker) = m.loragen("serve"), m.loragen("worker")
    a, w = m.settings(api, "serve"), m.settings(worker, "worker")
    for field in ("checkpoints", "compute_dtype", "cache_prefix", "trust_remote_code", "hf_allow"):
        assert getattr(a, field) == getattr(w, field), f"API nodes and workers differ in {field}"
    assert a.queue_url() == w.queue_url() and a.redis_url == w.redis_url, "API nodes and workers use other Redis"
    assert a.queue == "redis" and not a.embedded_worker, "the API Deployment must run `serve` with queue=redis"
    assert worker.get("args") == ["worker"], "the worker Deployment runs `loragen worker`"


def check_probes(m: Manifests) -> None:
    """Probes ask paths the process serves, on the port it listens on, with time to load and to ask Redis."""
    served = {"serve": api_http_routes(), "worker": worker_http_routes()}
    for command in ("serve", "worker"):
        workload, c = m.loragen(command)
        s = m.settings(c, command)
        name = workload["metadata"]["name"]
        assert s.host == "0.0.0.0", f"{name} listens on {s.host}: probes and Services cannot reach it"
        want = {"startupProbe": "/health", "livenessProbe": "/health", "readinessProbe": "/ready"}
        for probe, path in want.items():
            assert probe in c, f"{name}: no {probe}"
            get = c[probe]["httpGet"]
            assert get["path"] == path and path in served[command], f"{name} {probe}: {get['path']}"
            port = container_port(workload, get["port"])
            assert port == s.port, f"{name} {probe}: port {port}, but the process listens on {s.port}"
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, f"{name}: checkpoints need minutes"
        # an API node's /ready asks both Redis in turn, each bounded by LORAGEN_REDIS_TIMEOUT_S
        asks = 2 if command == "serve" else 1
        assert c["readinessProbe"]["timeoutSeconds"] > asks * s.redis_timeout_s, (
            f"{name}: a readiness timeout under {asks} x {s.redis_timeout_s} s fails while Redis is merely slow")


def check_services(m: Manifests) -> None:
    """Every selector selects one workload, every port is one it exposes; every autoscaler has a target."""
    for w in m.workloads:
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert w["spec"]["selector"]["matchLabels"].items() <= labels.items(), f"{w['metadata']['name']}: selector"
    for svc in m.of_kind("Service"):
        targets = m.selected(svc["spec"]["selector"])
        assert len(targets) == 1, f"Service {svc['metadata']['name']} selects {len(targets)} workloads, not one"
        (target,) = targets
        for p in svc["spec"]["ports"]:
            container_port(target, p.get("targetPort", p["port"]))
    for sts in m.of_kind("StatefulSet"):
        m.get("Service", sts["spec"]["serviceName"])
    for pdb in m.of_kind("PodDisruptionBudget"):
        assert len(m.selected(pdb["spec"]["selector"]["matchLabels"])) == 1, (
            f"PodDisruptionBudget {pdb['metadata']['name']} selects no workload, or several")
        assert pdb["spec"].get("maxUnavailable", 0) >= 1, f"PDB {pdb['metadata']['name']} would block node drains"
    (api, _), (worker, _) = m.loragen("serve"), m.loragen("worker")
    budgets = {tuple(m.selected(p["spec"]["selector"]["matchLabels"]))[0]["metadata"]["name"]
               for p in m.of_kind("PodDisruptionBudget")}
    assert {api["metadata"]["name"], worker["metadata"]["name"]} <= budgets, "API and workers need a PDB each"
    scaled = {}
    for hpa in m.of_kind("HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        target = m.get(ref["kind"], ref["name"])
        scaled[ref["name"]] = hpa["spec"]
        # the autoscaler owns the count: a replicas field would reset it on every `kubectl apply`
        assert "replicas" not in target["spec"], f"{ref['name']}: drop spec.replicas, the autoscaler sets it"
        for c in pod_spec(target)["containers"]:
            assert "cpu" in c["resources"]["requests"], f"{ref['name']}: CPU utilisation needs a CPU request"
    assert scaled[api["metadata"]["name"]]["minReplicas"] >= 2, "the API runs at least two replicas"
    assert worker["metadata"]["name"] in scaled, "the workers need an autoscaler"


def check_redis_roles(m: Manifests) -> None:
    """The cache URL names a Redis that evicts, the queue URL one that never does and keeps its data."""
    _, api = m.loragen("serve")
    s = m.settings(api, "serve")
    assert s.redis_url and s.queue_redis_url, "set both LORAGEN_REDIS_URL and LORAGEN_QUEUE_REDIS_URL"
    roles = {}
    for role, url in (("cache", s.redis_url), ("queue", s.queue_redis_url)):
        svc = m.service_for_url(url.get_secret_value())
        workloads = m.selected(svc["spec"]["selector"])
        assert len(workloads) == 1, f"{url}: its Service selects {len(workloads)} workloads, not one"
        containers = [c for c in pod_spec(workloads[0])["containers"] if c["image"] == compose()["services"]["redis"][
            "image"]]
        assert len(containers) == 1, f"{url}: its Service selects no Redis"
        workload, container = workloads[0], containers[0]
        roles[role] = (workload, m.redis_args(container))
    (cache, cache_args), (queue, queue_args) = roles["cache"], roles["queue"]
    assert cache is not queue, "the cache and the queue need a Redis each"
    assert cache_args.get("maxmemory-policy") == "allkeys-lru" and "maxmemory" in cache_args, (
        f"the cache Redis must be bounded and evict (maxmemory, allkeys-lru): {cache_args}")
    assert queue_args.get("maxmemory-policy") == "noeviction", f"the queue Redis evicts: {queue_args}"
    assert queue_args.get("appendonly") == "yes", "the queue Redis keeps its jobs across restarts: appendonly yes"
    mounts = {v["mountPath"]: v["name"] for c in pod_spec(queue)["containers"] for v in c.get("volumeMounts", [])}
    claims = [t["metadata"]["name"] for t in queue["spec"].get("volumeClaimTemplates", [])]
    assert mounts.get("/data") in claims, "the queue Redis's /data must be a persistent volume"
    compose_cache = " ".join(compose()["services"]["redis"]["command"])
    assert f"--maxmemory {cache_args['maxmemory']}" in compose_cache, "the cache Redis is sized as in compose"


def check_redis_memory(m: Manifests) -> None:
    """maxmemory well under the memory limit: Redis refuses or evicts before the kernel kills it."""
    for workload, container in m.redis():
        args = m.redis_args(container)
        name = workload["metadata"]["name"]
        assert "maxmemory" in args, f"{name}: no maxmemory, so the memory limit ends it with an OOM kill"
        limit = quantity_bytes(container["resources"]["limits"]["memory"])
        assert redis_bytes(args["maxmemory"]) <= 0.75 * limit, f"{name}: maxmemory {args['maxmemory']} vs {limit}"


def check_api_keys(m: Manifests) -> None:
    """API keys come from the Secret the docs create; no key is in the manifests."""
    _, api = m.loragen("serve")
    example = load_documents(SECRET_EXAMPLE)[0]
    ref = m.env(api)["LORAGEN_API_KEYS"]
    assert isinstance(ref, SecretRef) and not ref.optional, "LORAGEN_API_KEYS: a required secretKeyRef"
    assert (ref.name, ref.key) == (example["metadata"]["name"], next(iter(example["stringData"])))
    assert example["stringData"][ref.key] == "REPLACE-WITH-YOUR-KEYS", "the example holds a placeholder only"
    assert not m.of_kind("Secret"), "the kustomization applies no Secret: a committed one is a committed key"
    for cm in m.of_kind("ConfigMap"):
        assert not {"LORAGEN_API_KEYS", "LORAGEN_API_KEYS_FILE"} & set(cm.get("data", {})), "keys in a ConfigMap"


def check_termination_grace(m: Manifests) -> None:
    """The kubelet's SIGKILL comes after a worker drains, and after an API node finishes its requests."""
    worker, wc = m.loragen("worker")
    s = m.settings(wc, "worker")
    # SIGTERM: the blocked stream read ends, the batch in hand (its waiters give up after request_timeout_s)
    # finishes and is acknowledged, the heartbeat is withdrawn (a Redis round trip each)
    drain = s.request_timeout_s + stream_read_block_s() + 2 * s.redis_timeout_s
    grace = pod_spec(worker)["terminationGracePeriodSeconds"]
    assert grace >= drain + pre_stop_s(wc), f"worker: terminationGracePeriodSeconds {grace} < drain {drain:g} s"
    api, ac = m.loragen("serve")
    a = m.settings(ac, "serve")
    grace = pod_spec(api)["terminationGracePeriodSeconds"]
    assert grace > a.shutdown_grace_s + pre_stop_s(ac), f"API: {grace} s leaves no time for shutdown_grace_s"
    assert pre_stop_s(ac) > 0, "API: a preStop pause lets the Service drop the pod before it stops accepting"


def pre_stop_s(container: dict) -> float:
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    return float(command[1]) if command[:1] == ["sleep"] else 0.0


def check_images(m: Manifests, gpu: bool) -> None:
    """The images are the ones docker/ builds and docker-compose.yml runs, a GPU worker the CUDA one."""
    tags = image_dockerfiles()
    services = compose()["services"]
    (_, ac), (worker, wc) = m.loragen("serve"), m.loragen("worker")
    assert ac["image"] == services["loragen"]["image"] and tags[ac["image"]] == services["loragen"]["build"][
        "dockerfile"].removeprefix("docker/"), f"API image {ac['image']}"
    want = "Dockerfile.cuda" if gpu else "Dockerfile"
    assert tags.get(wc["image"]) == want, f"worker image {wc['image']}: expected the image of docker/{want}"
    gpus = [c["resources"].get(k, {}).get("nvidia.com/gpu") for c in pod_spec(worker)["containers"]
            for k in ("requests", "limits")]
    assert gpus == ([1, 1] if gpu else [None, None]), f"worker nvidia.com/gpu requests/limits: {gpus}"
    assert bool(pod_spec(worker).get("tolerations")) == gpu, "GPU workers tolerate GPU taints, CPU ones need not"
    for workload, container in m.redis():
        assert container["image"] == services["queue-redis"]["image"], workload["metadata"]["name"]
    assert len(m.redis()) == 2 and len(m.workloads) == 4, "an API, workers and two Redis; nothing else runs"


def check_security(m: Manifests) -> None:
    """The restricted Pod Security Standard, the images' own users, a read-only root with writable scratch."""
    ns = m.get("Namespace", "loragen")
    assert ns["metadata"]["labels"].get("pod-security.kubernetes.io/enforce") == "restricted"
    for w in m.workloads:
        spec, name = pod_spec(w), w["metadata"]["name"]
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, f"{name}: runAsNonRoot"
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{name}: seccompProfile"
        assert spec.get("automountServiceAccountToken") is False, f"{name}: it needs no API token"
        for c in spec["containers"]:
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc["capabilities"].get("add"), (
                f"{name}: capabilities: drop ALL, add none")
            assert sc.get("readOnlyRootFilesystem") is True, f"{name}: readOnlyRootFilesystem"
            assert sc.get("runAsUser", pod.get("runAsUser", 0)) != 0, f"{name}: runs as root"
            uid = sc.get("runAsUser", pod.get("runAsUser"))
            image_uid = dockerfile_uid(image_dockerfiles()[c["image"]]) if c["image"] in image_dockerfiles() else (
                REDIS_UID)
            assert uid == image_uid, f"{name}: runAsUser {uid}, the image's user is {image_uid}"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{name}: {kind} for cpu and memory"
            # what the process writes, on volumes: scratch for all; the hub cache (HF_HOME) for loragen
            writable = ["/tmp", m.env(c)["HF_HOME"]] if c["image"] in image_dockerfiles() else ["/data"]
            mounts = [v["mountPath"] for v in c.get("volumeMounts", [])]
            for path in writable:
                assert any(path == mp or path.startswith(mp.rstrip("/") + "/") for mp in mounts), (
                    f"{name}: {path} is written, and the root filesystem is read-only: mount a volume there")


def check_gpu_threads(m: Manifests) -> None:
    """torch's CPU threads follow the container's CPU limit, not the node's core count."""
    _, wc = m.loragen("worker")
    found = [v for v in wc.get("env", []) if v["name"] == "OMP_NUM_THREADS"]
    assert len(found) == 1 and found[0].get("valueFrom", {}).get("resourceFieldRef", {}).get("resource") == "limits.cpu", (
        "OMP_NUM_THREADS from limits.cpu")


def check_network_policy(m: Manifests) -> None:
    """Both Redis admit the API nodes and the workers, on the Redis port."""
    (api, _), (worker, _) = m.loragen("serve"), m.loragen("worker")
    redis_workloads = {w["metadata"]["name"] for w, _ in m.redis()}
    for policy in m.of_kind("NetworkPolicy"):
        guarded = {w["metadata"]["name"] for w in m.selected(policy["spec"]["podSelector"]["matchLabels"])}
        if guarded & redis_workloads:
            assert guarded == redis_workloads, f"NetworkPolicy {policy['metadata']['name']} guards {guarded}"
            for client in (api, worker):
                labels = client["spec"]["template"]["metadata"]["labels"]
                assert any(peer["podSelector"]["matchLabels"].items() <= labels.items() and
                           any(p["port"] in (6379, "redis") for p in rule.get("ports", []))
                           for rule in policy["spec"]["ingress"] for peer in rule["from"]), (
                    f"NetworkPolicy {policy['metadata']['name']} shuts out {client['metadata']['name']}")


CHECKS: dict[str, Callable[[Manifests, bool], None]] = {
    "env_names": lambda m, gpu: check_env_names(m),
    "shared_settings": lambda m, gpu: check_shared_settings(m),
    "probes": lambda m, gpu: check_probes(m),
    "services": lambda m, gpu: check_services(m),
    "redis_roles": lambda m, gpu: check_redis_roles(m),
    "redis_memory": lambda m, gpu: check_redis_memory(m),
    "api_keys": lambda m, gpu: check_api_keys(m),
    "termination_grace": lambda m, gpu: check_termination_grace(m),
    "images": check_images,
    "security": lambda m, gpu: check_security(m),
    "gpu_threads": lambda m, gpu: check_gpu_threads(m),
    "network_policy": lambda m, gpu: check_network_policy(m),
}


# ---------------------------------------------------------------------------------------------------------------
# the tests


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(path) for name, path in OVERLAYS.items()}


def test_every_file_is_listed_by_a_kustomization():
    """A manifest added to deploy/k8s/ and not to a kustomization would never be applied."""
    check_listing(K8S)


def check_listing(k8s: Path) -> None:
    expected = {"kustomization.yaml", "api-keys-secret.yaml.example", "cpu-workers/kustomization.yaml"}
    base = load_documents(k8s / "base" / "kustomization.yaml")[0]["resources"]
    assert load_documents(k8s / "kustomization.yaml")[0]["resources"] == ["base"]
    assert load_documents(k8s / "cpu-workers" / "kustomization.yaml")[0]["resources"] == ["../base"]
    listed = expected | {"base/kustomization.yaml"} | {f"base/{f}" for f in base}
    present = {str(p.relative_to(k8s)) for p in k8s.rglob("*") if p.is_file()}
    assert present == listed, f"not listed in a kustomization: {sorted(present - listed)}; " \
                              f"listed but missing: {sorted(listed - present)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_resource_is_valid_kubernetes(rendered, overlay, version):
    """Each resource against the Kubernetes API's schemas, strictly: a misspelt or misplaced field fails."""
    docs = rendered[overlay] + (load_documents(SECRET_EXAMPLE) if overlay == "gpu" else [])
    assert docs
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(map(str, e.path))
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {where}: {e.message}", pytrace=False)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubectl_kustomize_renders_the_same(rendered, overlay):
    """kustomize itself renders what render() does, so the checks above are about what gets applied."""
    if kubectl := shutil.which("kubectl"):
        command = [kubectl, "kustomize", str(OVERLAYS[overlay])]
    elif kustomize := shutil.which("kustomize"):
        command = [kustomize, "build", str(OVERLAYS[overlay])]
    else:
        pytest.skip("neither kubectl nor kustomize is installed here: render() stands in for `kubectl kustomize`")
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr

    def key(d: dict) -> tuple[str, str]:
        return d["kind"], d["metadata"]["name"]

    built = sorted((d for d in yaml.safe_load_all(out.stdout) if d), key=key)
    assert [key(d) for d in built] == sorted(map(key, rendered[overlay]))
    assert built == sorted(rendered[overlay], key=key)


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("check", CHECKS)
def test_cross_check(rendered, overlay, check):
    CHECKS[check](Manifests(copy.deepcopy(rendered[overlay])), overlay == "gpu")


def _container(docs: list[dict], name: str) -> dict:
    (w,) = [d for d in docs if d["kind"] in POD_OWNERS and d["metadata"]["name"] == name]
    return pod_spec(w)["containers"][0]


def _doc(docs: list[dict], kind: str, name: str) -> dict:
    (d,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return d


def _set_env(docs: list[dict], workload: str, name: str, value: str | None) -> None:
    c = _container(docs, workload)
    c["env"] = [v for v in c.get("env", []) if v["name"] != name] + ([{"name": name, "value": value}] if value else [])


def _set_arg(docs: list[dict], workload: str, option: str, value: str) -> None:
    args = _container(docs, workload)["args"]
    args[args.index(option) + 1] = value


BREAKAGES: dict[str, tuple[str, Callable[[list[dict]], None]]] = {
    # (the check that must catch it, what breaks)
    "an unknown setting": ("env_names", lambda d: _set_env(d, "loragen-api", "LORAGEN_QUEUE_URL", "x")),
    "a value the settings refuse": ("env_names", lambda d: _doc(d, "ConfigMap", "loragen-config")["data"].update(
        LORAGEN_CACHE_TTL_S="a week")),
    "service links on": ("env_names", lambda d: pod_spec(_doc(d, "Deployment", "loragen-worker")).update(
        enableServiceLinks=True)),
    "a Service named loragen": ("env_names", lambda d: _doc(d, "Service", "loragen-api")["metadata"].update(
        name="loragen")),
    "workers in another dtype": ("shared_settings", lambda d: _set_env(d, "loragen-worker", "LORAGEN_COMPUTE_DTYPE",
                                                                       "bfloat16")),
    "an API node that generates": ("shared_settings", lambda d: _set_env(d, "loragen-api", "LORAGEN_QUEUE", "local")),
    "readiness on /readyz": ("probes", lambda d: _container(d, "loragen-api")["readinessProbe"]["httpGet"].update(
        path="/readyz")),
    "no worker LORAGEN_PORT (the image's 8000)": ("probes", lambda d: _set_env(d, "loragen-worker", "LORAGEN_PORT",
                                                                               None)),
    "a probe on an undeclared port": ("probes", lambda d: _container(d, "loragen-worker")["livenessProbe"][
        "httpGet"].update(port=9000)),
    "no startup allowance": ("probes", lambda d: _container(d, "loragen-api")["startupProbe"].update(
        failureThreshold=3)),
    "a readiness timeout Redis can exceed": ("probes", lambda d: _container(d, "loragen-api")[
        "readinessProbe"].update(timeoutSeconds=1)),
    "a Service selecting nothing": ("services", lambda d: _doc(d, "Service", "loragen-api")["spec"]["selector"].update(
        {"app.kubernetes.io/component": "apis"})),
    "a Service on a port nobody exposes": ("services", lambda d: _doc(d, "Service", "loragen-redis-queue")["spec"][
        "ports"][0].update(targetPort="redis-queue")),
    "replicas fixed under an autoscaler": ("services", lambda d: _doc(d, "Deployment", "loragen-api")["spec"].update(
        replicas=3)),
    "one API replica": ("services", lambda d: _doc(d, "HorizontalPodAutoscaler", "loragen-api")["spec"].update(
        minReplicas=1)),
    "a PDB selecting nothing": ("services", lambda d: _doc(d, "PodDisruptionBudget", "loragen-worker")["spec"][
        "selector"]["matchLabels"].update({"app.kubernetes.io/component": "workers"})),
    "the cache URL on the queue Redis": ("redis_roles", lambda d: _doc(d, "ConfigMap", "loragen-config")[
        "data"].update(LORAGEN_REDIS_URL="redis://loragen-redis-queue:6379/0")),
    "a URL to no Service": ("redis_roles", lambda d: _doc(d, "ConfigMap", "loragen-config")["data"].update(
        LORAGEN_QUEUE_REDIS_URL="redis://redis-queue:6379/0")),
    "a URL on the wrong port": ("redis_roles", lambda d: _doc(d, "ConfigMap", "loragen-config")["data"].update(
        LORAGEN_QUEUE_REDIS_URL="redis://loragen-redis-queue:6380/0")),
    "a queue Redis that evicts": ("redis_roles", lambda d: _set_arg(d, "loragen-redis-queue", "--maxmemory-policy",
                                                                    "allkeys-lru")),
    "a queue Redis without persistence": ("redis_roles", lambda d: _set_arg(d, "loragen-redis-queue", "--appendonly",
                                                                            "no")),
    "a cache Redis that never evicts": ("redis_roles", lambda d: _set_arg(d, "loragen-redis-cache",
                                                                          "--maxmemory-policy", "noeviction")),
    "maxmemory over the limit": ("redis_memory", lambda d: _set_arg(d, "loragen-redis-cache", "--maxmemory", "4gb")),
    "a key in the Deployment": ("api_keys", lambda d: _set_env(d, "loragen-api", "LORAGEN_API_KEYS", "s3cret")),
    "an optional key Secret": ("api_keys", lambda d: [v for v in _container(d, "loragen-api")["env"] if v["name"] ==
                                                      "LORAGEN_API_KEYS"][0]["valueFrom"]["secretKeyRef"].update(
        optional=True)),
    "a Secret applied": ("api_keys", lambda d: d.append(load_documents(SECRET_EXAMPLE)[0])),
    "a short worker grace": ("termination_grace", lambda d: pod_spec(_doc(d, "Deployment", "loragen-worker")).update(
        terminationGracePeriodSeconds=30)),
    "a longer request timeout": ("termination_grace", lambda d: _doc(d, "ConfigMap", "loragen-config")[
        "data"].update(LORAGEN_REQUEST_TIMEOUT_S="120")),
    "an API grace under shutdown_grace_s": ("termination_grace", lambda d: _set_env(
        d, "loragen-api", "LORAGEN_SHUTDOWN_GRACE_S", "60")),
    "no preStop on the API": ("termination_grace", lambda d: _container(d, "loragen-api").pop("lifecycle")),
    "an image docker/ does not build": ("images", lambda d: _container(d, "loragen-api").update(
        image="loragen:latest")),
    "a GPU worker on the CPU image": ("images", lambda d: _container(d, "loragen-worker").update(image="loragen:cpu")),
    "another Redis image": ("images", lambda d: _container(d, "loragen-redis-cache").update(image="redis:6")),
    "runs as root": ("security", lambda d: pod_spec(_doc(d, "Deployment", "loragen-api"))["securityContext"].update(
        runAsUser=0)),
    "a writable root": ("security", lambda d: _container(d, "loragen-worker")["securityContext"].update(
        readOnlyRootFilesystem=False)),
    "capabilities kept": ("security", lambda d: _container(d, "loragen-redis-queue")["securityContext"].pop(
        "capabilities")),
    "no seccomp profile": ("security", lambda d: pod_spec(_doc(d, "StatefulSet", "loragen-redis-queue"))[
        "securityContext"].pop("seccompProfile")),
    "privilege escalation": ("security", lambda d: _container(d, "loragen-api")["securityContext"].update(
        allowPrivilegeEscalation=True)),
    "no /tmp volume": ("security", lambda d: _container(d, "loragen-api").update(volumeMounts=[
        v for v in _container(d, "loragen-api")["volumeMounts"] if v["mountPath"] != "/tmp"])),
    "another uid than the image's": ("security", lambda d: pod_spec(_doc(d, "Deployment", "loragen-worker"))[
        "securityContext"].update(runAsUser=1000)),
    "no memory limit": ("security", lambda d: _container(d, "loragen-redis-cache")["resources"]["limits"].pop(
        "memory")),
    "torch on every core of the node": ("gpu_threads", lambda d: _set_env(d, "loragen-worker", "OMP_NUM_THREADS",
                                                                          None)),
    "workers shut out of Redis": ("network_policy", lambda d: _doc(d, "NetworkPolicy", "loragen-redis")["spec"][
        "ingress"][0]["from"][0]["podSelector"]["matchLabels"].update({"app.kubernetes.io/component": "api"})),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_each_check_catches_its_breakage(rendered, breakage):
    """Break one property of the GPU deployment: its check must fail (and the untouched manifests pass)."""
    check, breaks = BREAKAGES[breakage]
    docs = copy.deepcopy(rendered["gpu"])
    breaks(docs)
    with pytest.raises(AssertionError):
        CHECKS[check](Manifests(docs), True)


def test_a_manifest_missing_from_the_kustomization_is_caught(tmp_path):
    copy_ = tmp_path / "k8s"
    shutil.copytree(K8S, copy_)
    (copy_ / "base" / "ingress.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    with pytest.raises(AssertionError, match="ingress.yaml"):
        check_listing(copy_)


def test_the_docs_yaml_is_valid_and_names_the_manifests():
    """docs/kubernetes.md: its Kubernetes YAML validates; it says how to apply and names every manifest file."""
    text = DOC.read_text()
    blocks = re.findall(r"^```yaml\n(.*?)^```", text, re.S | re.M)
    assert blocks, "docs/kubernetes.md shows the Ingress and the patches as ```yaml blocks"
    validated = 0
    for block in blocks:
        for doc in (d for d in yaml.safe_load_all(block) if d):
            if "apiVersion" not in doc or doc["kind"] in ("Kustomization", "ScaledObject"):
                continue  # kustomize's own files and KEDA's resource have no schema in the Kubernetes API
            kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)
            validated += 1
    assert validated, "no Kubernetes resource in the docs' yaml blocks was validated"
    assert "kubectl apply -k deploy/k8s/" in text
    for path in sorted(K8S.rglob("*")):
        if path.is_file() and path.name != "kustomization.yaml":
            assert path.name in text, f"docs/kubernetes.md does not mention {path.relative_to(ROOT)}"
