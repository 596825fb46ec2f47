"""The shipped deployment files, checked without Docker or a cluster (neither runs here):
Kubernetes manifests against the Kubernetes API's own schemas (kubernetes-validate, strict), the
GPU overlay applied and validated too; the compose file parsed as YAML with its service graph
asserted (and `docker compose config` where a Docker CLI with compose exists); the Dockerfiles'
sources and settings; and every metric that the dashboard, the HPA and the adapter name is one a
running daemon exports."""
import copy
import json
import re
import shutil
import subprocess
import urllib.request

import kubernetes_validate
import pytest
import yaml

from conftest import API_KEY, ROOT

K8S = ROOT / "deploy" / "k8s"
DOCKER = ROOT / "docker"
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")


def docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomized(directory):
    """The resources a kustomization lists (recursively for bases), patches applied."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    out = []
    for r in k.get("resources", []):
        target = (directory / r).resolve()
        out += kustomized(target) if target.is_dir() else docs(target)
    for p in k.get("patches", []):
        patch = yaml.safe_load((directory / p["path"]).read_text())
        hits = [d for d in out if d["kind"] == patch["kind"]
                and d["metadata"]["name"] == patch["metadata"]["name"]]
        assert len(hits) == 1, f"{p['path']} patches no resource"
        out[out.index(hits[0])] = strategic_merge(hits[0], patch)
    return out


# Merge keys of the lists the overlay patches (Kubernetes' strategic merge patch).
MERGE_KEYS = {"containers": "name", "env": "name", "volumeMounts": "mountPath",
              "tolerations": None}


def strategic_merge(base, patch, key=None):
    if isinstance(patch, dict):
        out = copy.deepcopy(base) if isinstance(base, dict) else {}
        for k, v in patch.items():
            out[k] = strategic_merge(out.get(k), v, k)
        return out
    if isinstance(patch, list) and MERGE_KEYS.get(key):
        mk = MERGE_KEYS[key]
        out = copy.deepcopy(base or [])
        for item in patch:
            same = [i for i, b in enumerate(out) if b[mk] == item[mk]]
            if item.get("$patch") == "delete":
                assert same, f"deleting {item} that is not there"
                del out[same[0]]
            elif same:
                out[same[0]] = strategic_merge(out[same[0]], item)
            else:
                out.append(item)
        return out
    return copy.deepcopy(patch)


def validate_all(resources):
    for version in KUBERNETES_VERSIONS:
        for r in resources:
            try:
                kubernetes_validate.validate(r, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{r['kind']}/{r['metadata']['name']} on {version}: {e.message} "
                            f"at {list(e.path)}")


def by_kind(resources, kind, name):
    [r] = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    return r


def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_kubernetes_manifests_validate_against_the_api_schemas():
    cpu = kustomized(K8S)
    assert {r["kind"] for r in cpu} >= {"Deployment", "Service", "HorizontalPodAutoscaler",
                                         "PodDisruptionBudget", "PersistentVolumeClaim", "Job"}
    validate_all(cpu)

    d = by_kind(cpu, "Deployment", "inferd")
    pod = d["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    env = env_of(c)
    drain, grace = int(env["INFERD_DRAIN_DELAY"]), int(env["INFERD_SHUTDOWN_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] > drain + grace, "the kubelet would kill mid-drain"
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
    assert all(m["readOnly"] for m in c["volumeMounts"]), "models are mounted read-only"
    labels = d["spec"]["selector"]["matchLabels"]
    for svc in ("inferd", "inferd-pods"):
        assert by_kind(cpu, "Service", svc)["spec"]["selector"] == labels
    assert by_kind(cpu, "Service", "inferd-pods")["spec"]["clusterIP"] == "None"
    hpa = by_kind(cpu, "HorizontalPodAutoscaler", "inferd")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "inferd"
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    claim = pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert by_kind(cpu, "PersistentVolumeClaim", claim)

    gpu = kustomized(K8S / "gpu")
    validate_all(gpu)
    [g] = by_kind(gpu, "Deployment", "inferd")["spec"]["template"]["spec"]["containers"]
    assert g["image"] == "inferd:cuda"
    assert g["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert env_of(g)["INFERD_DEVICE"] == "cuda" and "INFERD_KV_CACHE_MEMORY" not in env_of(g)
    assert g["readinessProbe"] == c["readinessProbe"], "the overlay keeps the base's probes"


def test_compose_profiles_and_service_graph():
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    services = compose["services"]
    profiles = {name: tuple(s.get("profiles", ())) for name, s in services.items()}
    assert profiles == {"models": (), "inferd": ("cpu",), "inferd-cuda": ("cuda",),
                        "inferd-replica": ("scale",), "lb": ("scale",),
                        "prometheus": ("scale",), "grafana": ("scale",)}
    env_file = dict(l.split("=", 1) for l in (DOCKER / ".env").read_text().splitlines()
                    if l and not l.startswith("#"))
    assert env_file["COMPOSE_PROFILES"] == "cpu", "plain `up` runs the cpu profile"

    for name in ("inferd", "inferd-cuda", "inferd-replica"):
        s = services[name]
        assert s["depends_on"]["models"]["condition"] == "service_completed_successfully"
        assert "models:/models:ro" in s["volumes"]
        env = s["environment"]
        drain, grace = int(env["INFERD_DRAIN_DELAY"]), int(env["INFERD_SHUTDOWN_TIMEOUT"])
        assert int(s["stop_grace_period"].rstrip("s")) > drain + grace
        assert s["stop_signal"] == "SIGTERM"
        assert (ROOT / "docker" / s["build"]["context"] / s["build"]["dockerfile"]).exists()
    assert services["inferd-cuda"]["environment"]["INFERD_DEVICE"] == "cuda"
    [gpu] = services["inferd-cuda"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert "ports" not in services["inferd-replica"], "replicas are reached through the balancer"
    assert services["lb"]["environment"]["INFERD_SERVICE"] == "inferd-replica"
    assert "inferd-replica" in services["lb"]["depends_on"]

    # Every file a service mounts from the repository exists.
    for name, s in services.items():
        for v in s.get("volumes", []):
            source = v.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name} mounts missing {source}"

    prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["inferd"]["dns_sd_configs"][0]["names"] == ["inferd-replica"]
    assert jobs["haproxy"]["static_configs"][0]["targets"] == ["lb:8405"]

    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        for profile in ("cpu", "cuda", "scale"):
            subprocess.run([docker, "compose", "-f", str(DOCKER / "docker-compose.yml"),
                            "--profile", profile, "config", "--quiet"], check=True)


def test_dockerfiles_run_unprivileged_and_drain():
    rust_version = re.search(r'rust-version = "([\d.]+)"',
                             (ROOT / "Cargo.toml").read_text()).group(1)
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (DOCKER / name).read_text()
        for line in text.splitlines():
            if line.startswith("COPY") and "--from" not in line:
                for source in line.split()[1:-1]:
                    assert (ROOT / source).exists(), f"{name}: COPY {source}"
        assert re.search(r"^USER 10001", text, re.M), f"{name} runs as root"
        assert "STOPSIGNAL SIGTERM" in text and "INFERD_DRAIN_DELAY" in text
        assert re.search(r"HEALTHCHECK .*\n.*/health", text), name
        toolchain = re.search(r"rust:([\d.]+)|--default-toolchain ([\d.]+)", text)
        version = next(v for v in toolchain.groups() if v)
        assert tuple(map(int, version.split("."))) >= tuple(map(int, rust_version.split(".")))
    cuda = (DOCKER / "Dockerfile.cuda").read_text()
    assert "ARG CUDA_COMPUTE_CAP" in cuda and "--features cuda" in cuda


def test_every_metric_the_dashboard_and_autoscaler_use_is_exported(smol):
    request = urllib.request.Request(smol.base + "/metrics",
                                     headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        exported = {re.split(r"[{ ]", l)[0] for l in r.read().decode().splitlines()
                    if l and not l.startswith("#")}
    exported |= {re.sub(r"_(bucket|sum|count)$", "", n) for n in exported}

    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "inferd.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [dashboard["templating"]["list"][0]["definition"]]
    adapter = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    queries += [r["seriesQuery"] for r in adapter["rules"]["custom"]]
    used = {m for q in queries for m in re.findall(r"\b((?:vllm|inferd):[a-z0-9_]+)", q)}
    used = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert "vllm:num_requests_waiting" in used
    assert used <= exported, f"not exported: {sorted(used - exported)}"
    # The adapter's rename gives the name the HPA asks for.
    rule = adapter["rules"]["custom"][0]
    renamed = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"),
                     "vllm:num_requests_waiting")
    hpa = docs(K8S / "hpa.yaml")[0]
    assert renamed == hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
