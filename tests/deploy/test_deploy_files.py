"""Structure and consistency of the deployment files: Dockerfile, docker-compose.yml, deploy/.

Docker cannot run on the development machine, so these files are checked by parsing: each test
names the file and what is wrong.
"""

from __future__ import annotations

import json
import re
import shlex

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

import pytest
from deploy_helpers import (
    API_JOB,
    API_PORT,
    CONTRACT,
    DASHBOARD_DIR,
    DEPLOY,
    EXPOSED,
    K8S_DIR,
    PROMETHEUS_YML,
    RESET,
    ROOT,
    WORKER_JOB,
    WORKER_METRICS_PORT,
    dashboard_exprs,
    dashboard_variable_queries,
    dashboards,
    load_yaml,
    load_yaml_docs,
    metric_names_in,
    rule_exprs,
    substitute_grafana_vars,
)

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
COMPOSE = load_yaml(ROOT / "docker-compose.yml")


# ----------------------------------------------------------------------------------- Dockerfile
def dockerfile_instructions(path: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


DOCKERFILE = dockerfile_instructions()


def instr(name: str) -> list[str]:
    return [a for i, a in DOCKERFILE if i == name]


def exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"use the exec form (JSON array), got {args!r}"
    return json.loads(args)


ARGS = dict(a.split("=", 1) for a in instr("ARG") if "=" in a)


def test_dockerfile_base_is_cuda_pytorch():
    froms = instr("FROM")
    # every stage starts from the one base: the wheel stage and the image
    assert {f.split()[0] for f in froms} == {"${BASE_IMAGE}"}, froms
    base = ARGS["BASE_IMAGE"]
    assert base.startswith("pytorch/pytorch:") and "cuda" in base and "cudnn" in base, base
    assert ARGS["DEVICE"] == "cuda", "GPU images stay the default: DEVICE=cpu is the opt-in"


def test_dockerfile_has_no_frontend_line():
    """`# syntax=docker/dockerfile:...` makes BuildKit fetch a frontend image from Docker Hub: an
    offline or mirrored build fails on it."""
    first = (ROOT / "Dockerfile").read_text().lstrip().splitlines()[0]
    assert not re.match(r"#\s*syntax\s*=", first), first


def test_dockerfile_installs_locked_dependencies_and_extras_keeping_torch():
    runs = " ".join(instr("RUN"))
    extras = set(PYPROJECT["project"]["optional-dependencies"]) - {"dev"}
    named = set(re.findall(r"x\['([a-z]+)'\]", runs))
    assert named == extras, f"extras in the Dockerfile {sorted(named)} != pyproject's (without dev) {sorted(extras)}"
    installs = re.findall(r"pip install ([^&;]*)", runs)
    assert installs, "no pip install in the Dockerfile"
    # every install with dependencies is constrained to the base's torch and to the lock
    for i in installs:
        if "--no-deps" in i:
            continue
        assert "-c torch-constraint.txt" in i and "-c lock-without-torch.txt" in i, f"unconstrained: {i!r}"
    assert "m.version('torch')" in runs, "the torch constraint must be read from the image's installed torch"
    assert "lock.py check lock.txt" in runs, "the build must check the installed versions against the lock"
    assert "constraints/lock.txt" in " ".join(instr("COPY"))
    # the CUDA assert holds for the default (GPU) build, and only there
    assert re.search(r'if \[ "\$\{DEVICE\}" = cuda \]; then python -c "import torch; assert torch.version.cuda', runs)


def test_dockerfile_leaves_no_build_tree():
    """The project goes in as a wheel built in its own stage: no sources, build/ or egg-info."""
    runs = instr("RUN")
    assert any("pip wheel" in r for r in runs)
    install = next(r for r in runs if "pip install --no-deps /wheels/" in r)
    assert "rm -rf /wheels" in install
    final = DOCKERFILE[max(i for i, (k, _) in enumerate(DOCKERFILE) if k == "FROM") :]
    copied = [a for k, a in final if k == "COPY"]
    assert not any(re.search(r"(^|\s)arcdiff(\s|$)", a) for a in copied), f"sources copied into the image: {copied}"


def test_dockerfile_copies_existing_paths():
    # COPY --from=STAGE copies from another stage, not from the repository
    from_context = [a for a in instr("COPY") if not a.startswith("--from=")]
    for args in from_context:
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        for src in parts[:-1]:
            if "*" in src:
                continue
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    ignored = [
        ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    for args in from_context:
        for src in [p for p in shlex.split(args) if not p.startswith("--")][:-1]:
            top = src.rstrip("*").split("/")[0]
            assert top not in ignored and src not in ignored, f"COPY {src} but .dockerignore excludes it"
    # the package sources all go in
    copied = " ".join(instr("COPY"))
    packages = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    assert packages == ["arcdiff", "arcdiff.*"], packages
    assert re.search(r"\barcdiff\b", copied), "arcdiff/ is not copied into the image"
    assert "deploy/gpu-check.sh" in copied, "the GPU check script is not in the image"


def test_dockerfile_runs_as_non_root_with_healthcheck():
    users = instr("USER")
    assert users and users[-1] not in ("root", "0", "0:0"), f"last USER must be a non-root user, got {users}"
    order = [i for i, _ in DOCKERFILE]
    assert max(i for i, x in enumerate(order) if x == "USER") < order.index("ENTRYPOINT")
    hc = instr("HEALTHCHECK")
    assert len(hc) == 1 and " CMD " in f" {hc[0]} ", hc
    script = re.search(r"/usr/local/bin/(\S+?)\"", hc[0]).group(1)
    assert any(script in a and "healthcheck.py" in a for a in instr("COPY")), "healthcheck script not copied"


def test_dockerfile_ports_and_command():
    exposed = {int(p.split("/")[0]) for a in instr("EXPOSE") for p in a.split()}
    assert exposed == {API_PORT, WORKER_METRICS_PORT}
    assert exec_form(instr("ENTRYPOINT")[-1]) == ["arcdiff"]
    cmd = exec_form(instr("CMD")[-1])
    assert (
        cmd[0] == "serve"
        and cmd[cmd.index("--port") + 1] == str(API_PORT)
        and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    )
    env = " ".join(instr("ENV"))
    assert re.search(r"ARCDIFF_MODEL_DIR=\"\"", env), "ARCDIFF_MODEL_DIR should default to empty (the bundled models)"
    assert f"ARCDIFF_WORKER_METRICS_PORT={WORKER_METRICS_PORT}" in env


def test_dockerignore_keeps_build_inputs_out_of_the_way():
    ignored = {
        ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    }
    for must in (".git", ".venv", "runs", "tests"):
        assert must in ignored, f".dockerignore should exclude {must}"
    for keep in ("model", "worker", "service", "pyproject.toml", "README.md", "deploy/docker", "deploy"):
        assert keep not in ignored, f".dockerignore must not exclude {keep}"


# ------------------------------------------------------------------------------ docker compose
def service(name: str) -> dict:
    assert name in COMPOSE["services"], f"docker-compose.yml has no service {name!r}"
    return COMPOSE["services"][name]


def worker_services() -> dict[str, dict]:
    return {n: s for n, s in COMPOSE["services"].items() if (s.get("command") or [None])[0] == "worker"}


def flag(cmd: list[str], name: str) -> str:
    assert name in cmd, f"{name} missing from {cmd}"
    return cmd[cmd.index(name) + 1]


def flags(cmd: list[str], name: str) -> list[str]:
    return [cmd[i + 1] for i, c in enumerate(cmd) if c == name]


def test_compose_services_and_healthchecks():
    assert {"redis", "api", "worker", "prometheus", "grafana"} <= set(COMPOSE["services"])
    for name, svc in COMPOSE["services"].items():
        hc = svc.get("healthcheck")
        assert hc and hc.get("test"), f"service {name} has no healthcheck"
        assert hc["test"][0] in ("CMD", "CMD-SHELL"), f"{name}: healthcheck test must start with CMD/CMD-SHELL"
    assert service("redis")["healthcheck"]["test"][1:] == ["redis-cli", "ping"]


def test_compose_api_and_workers_wait_for_healthy_redis():
    arcdiff = {n: s for n, s in COMPOSE["services"].items() if s.get("image", "").startswith("arcdiff:")}
    assert {"api", "worker"} <= set(arcdiff)
    for name, svc in arcdiff.items():
        dep = svc.get("depends_on", {})
        assert isinstance(dep, dict), f"{name}: depends_on must use the long form with conditions"
        assert dep.get("redis", {}).get("condition") == "service_healthy", f"{name} must wait for a healthy redis"
        env = svc.get("environment", {})
        assert env.get("ARCDIFF_REDIS_URL") == "redis://redis:6379/0"
        assert flag(svc["command"], "--redis") == env["ARCDIFF_REDIS_URL"]
    assert service("grafana")["depends_on"]["prometheus"]["condition"] == "service_healthy"
    # every depends_on names a service that exists and a valid condition
    for name, svc in COMPOSE["services"].items():
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert dep in COMPOSE["services"], f"{name} depends on unknown {dep}"
            assert spec["condition"] in ("service_started", "service_healthy", "service_completed_successfully")


def test_compose_one_image_for_api_and_workers():
    images = {s["image"] for n, s in COMPOSE["services"].items() if n == "api" or n in worker_services()}
    assert len(images) == 1, images
    (image,) = images
    assert image.startswith("arcdiff:")
    build = service("api")["build"]
    assert build["context"] == "." and build.get("dockerfile", "Dockerfile") == "Dockerfile"
    assert service("api")["command"][0] == "serve"
    # built once: only the api carries `build:`; the workers run its tag and never pull it
    builders = [n for n, s in COMPOSE["services"].items() if "build" in s]
    assert builders == ["api"], f"services that build the image: {builders} (`up --build` would build it twice)"
    for name, w in worker_services().items():
        assert w.get("pull_policy") == "never", f"{name}: the arcdiff image is built here, never pulled"


def test_compose_workers_outlast_their_drain():
    """Compose SIGKILLs a container stop_grace_period after SIGTERM (default 10 s): a worker must
    get longer than its drain (ARCDIFF_DRAIN_TIMEOUT_S), or it dies mid-drain with jobs 'started'."""
    from arcdiff.worker.settings import WorkerSettings

    drain_s = WorkerSettings.model_fields["drain_timeout_s"].default
    for name, w in worker_services().items():
        grace = w.get("stop_grace_period", "10s")
        m = re.fullmatch(r"(\d+)s", str(grace))
        assert m and int(m.group(1)) >= drain_s + 10, f"{name}: stop_grace_period {grace} vs drain {drain_s} s"
    (pod,) = [d for d in load_yaml_docs(K8S_DIR / "worker.yaml") if d.get("kind") == "Deployment"]
    assert pod["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= drain_s + 10


def test_compose_redis_protected_mode_set_explicitly():
    """Only the official Redis image turns protected mode off in its own config; any other build
    refuses the API and the workers unless the command says so."""
    cmd = service("redis")["command"]
    assert flag(cmd, "--protected-mode") == "no"
    assert not service("redis").get("ports"), "Redis must not be published on the host"


def test_compose_api_on_loopback_by_default():
    """Secure by default: without API keys nothing may be open to the network."""
    (port,) = service("api")["ports"]
    assert str(port).startswith("${ARCDIFF_API_BIND:-127.0.0.1}:"), port
    for name in ("prometheus", "grafana"):
        assert all(str(p).startswith("127.0.0.1:") for p in service(name)["ports"]), name


def test_compose_cpu_override():
    """docker-compose.cpu.yml: the CPU image (DEVICE=cpu) and a CPU worker without a GPU reservation."""
    cpu = load_yaml(ROOT / "docker-compose.cpu.yml")["services"]
    assert cpu["api"]["build"]["args"]["DEVICE"] == "cpu"
    assert cpu["api"]["image"] == cpu["worker"]["image"] != service("api")["image"]
    assert flag(cpu["worker"]["command"], "--device") == "cpu"
    assert cpu["worker"]["deploy"] == RESET, "the override must reset the GPU reservation (`deploy: !reset {}`)"
    # the rest of the command is the GPU worker's
    gpu_cmd = service("worker")["command"]
    assert [c for c in cpu["worker"]["command"] if c != "cpu"] == [c for c in gpu_cmd if c != "cuda:0"]


def test_compose_ports_agree_with_dockerfile():
    api = service("api")
    assert flag(api["command"], "--port") == str(API_PORT)
    targets = {int(str(p).split(":")[-1]) for p in api["ports"]}
    assert targets == {API_PORT}, f"api publishes container ports {targets}, the image serves {API_PORT}"
    # the image's healthcheck follows the command's ports; a fixed URL here would not
    assert "HEALTHCHECK_URL" not in api["environment"]
    for name, w in worker_services().items():
        assert flag(w["command"], "--metrics-port") == str(WORKER_METRICS_PORT), name
        assert w["environment"]["ARCDIFF_WORKER_METRICS_PORT"] == str(WORKER_METRICS_PORT), name
        assert "HEALTHCHECK_URL" not in w["environment"], name
        assert str(WORKER_METRICS_PORT) in [str(p) for p in w.get("expose", [])], name


def test_compose_gpu_workers_one_gpu_each():
    workers = worker_services()
    assert len(workers) >= 2, "document one worker per GPU with a second pinned service"
    seen = []
    for name, w in workers.items():
        devices = w["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        (d,) = devices
        assert d["driver"] == "nvidia" and "gpu" in d["capabilities"], name
        assert "count" not in d or "device_ids" not in d, f"{name}: count and device_ids are exclusive"
        assert len(d["device_ids"]) == 1, f"{name}: one GPU per worker"
        seen += d["device_ids"]
        # the reserved GPU is the only one visible in the container
        assert flag(w["command"], "--device") == "cuda:0", name
        assert flags(w["command"], "--model"), f"{name}: no --model"
        assert int(flag(w["command"], "--max-batch")) > 0
    assert len(seen) == len(set(seen)), f"two workers reserve the same GPU: {seen}"
    assert "0" in seen and "1" in seen
    # only the first GPU's worker starts by default; the others are behind a profile
    assert "profiles" not in workers["worker"]
    assert all(w.get("profiles") for n, w in workers.items() if n != "worker")


def test_compose_monitoring_mounts_deploy_files():
    prom = service("prometheus")
    mounts = {v.split(":")[0]: v.split(":")[1] for v in prom["volumes"]}
    assert mounts.get("./deploy/prometheus") == "/etc/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    assert any(str(p).endswith(":9090") for p in prom["ports"])
    graf = service("grafana")
    gm = {v.split(":")[0]: v.split(":")[1] for v in graf["volumes"]}
    assert gm.get("./deploy/grafana/provisioning") == "/etc/grafana/provisioning"
    dash_mount = gm.get("./deploy/grafana/dashboards")
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/arcdiff.yml")["providers"][0]
    assert provider["options"]["path"] == dash_mount, "the dashboard provider must read where compose mounts the JSON"
    home = graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dash_mount + "/") and (DASHBOARD_DIR / Path(home).name).is_file()
    assert any(str(p).endswith(":3000") for p in graf["ports"])
    for vol in [v.split(":")[0] for s in COMPOSE["services"].values() for v in s.get("volumes", [])]:
        if vol.startswith("."):
            assert (ROOT / vol).exists(), f"compose mounts {vol}, which is not in the repository"
        else:
            assert vol in COMPOSE.get("volumes", {}), f"named volume {vol} is not declared"


def test_compose_prometheus_scrapes_compose_services():
    cfg = load_yaml(PROMETHEUS_YML)
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert jobs[API_JOB]["static_configs"][0]["targets"] == [f"api:{API_PORT}"]
    (sd,) = jobs[WORKER_JOB]["dns_sd_configs"]
    assert sd["port"] == WORKER_METRICS_PORT
    assert set(sd["names"]) == set(worker_services()), "prometheus must discover every worker service"
    assert cfg["rule_files"] == ["alerts.yml"]
    ds = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"][0]
    assert ds["url"] == "http://prometheus:9090" and ds["type"] == "prometheus"
    assert ds["jsonData"]["timeInterval"] == cfg["global"]["scrape_interval"]


# ---------------------------------------------------------------------------------- Kubernetes
def k8s_docs() -> list[dict]:
    return [d for p in sorted(K8S_DIR.glob("*.yaml")) if p.name != "kustomization.yaml" for d in load_yaml_docs(p)]


def k8s(kind: str, name: str) -> dict:
    found = [d for d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name} in deploy/k8s, found {len(found)}"
    return found[0]


def container(deploy: dict) -> dict:
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    return c


def test_k8s_manifests_parse_with_required_fields():
    docs = k8s_docs()
    assert docs
    for d in docs:
        where = f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"
        assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), where
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "arcdiff", where
        if d["kind"] in ("Deployment", "StatefulSet"):
            spec = d["spec"]
            sel = spec["selector"]["matchLabels"]
            labels = spec["template"]["metadata"]["labels"]
            assert sel.items() <= labels.items(), f"{where}: selector does not match the pod labels"
            for c in spec["template"]["spec"]["containers"]:
                assert c.get("name") and c.get("image"), where
                assert c.get("resources", {}).get("requests"), f"{where}: set resource requests"
                names = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
                for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                    port = (c.get(probe, {}).get("httpGet") or c.get(probe, {}).get("tcpSocket") or {}).get("port")
                    if port is not None:
                        assert port in names or port in names.values(), (
                            f"{where}: {probe} port {port} not a container port"
                        )
        if d["kind"] == "Service":
            pods = [
                x
                for x in docs
                if x["kind"] in ("Deployment", "StatefulSet")
                and d["spec"]["selector"].items() <= x["spec"]["template"]["metadata"]["labels"].items()
            ]
            assert len(pods) == 1, f"{where}: selector matches {len(pods)} Deployments or StatefulSets"
            ports = {
                p["name"]: p["containerPort"]
                for c in pods[0]["spec"]["template"]["spec"]["containers"]
                for p in c["ports"]
            }
            for p in d["spec"]["ports"]:
                assert p["targetPort"] in ports or p["targetPort"] in ports.values(), (
                    f"{where}: targetPort {p['targetPort']}"
                )


def test_k8s_kustomization_lists_every_manifest():
    kust = load_yaml(K8S_DIR / "kustomization.yaml")
    files = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files
    assert kust["namespace"] == "arcdiff"


def test_k8s_images_and_ports_agree_with_compose_and_dockerfile():
    image = service("api")["image"]
    api, worker = k8s("Deployment", "arcdiff-api"), k8s("Deployment", "arcdiff-worker")
    for d in (api, worker):
        c = container(d)
        assert c["image"] == image, f"{d['metadata']['name']} runs {c['image']}, compose builds {image}"
        assert "command" not in c, "keep the image's ENTRYPOINT (arcdiff): use args"
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert d["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    kust = load_yaml(K8S_DIR / "kustomization.yaml")
    (img,) = kust["images"]
    assert f"{img['name']}:{img['newTag']}" == image

    ca = container(api)
    assert ca["args"][0] == "serve" and flag(ca["args"], "--port") == str(API_PORT)
    assert {p["containerPort"] for p in ca["ports"]} == {API_PORT}
    assert ca["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert ca["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ann = api["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/port"] == str(API_PORT) and ann["prometheus.io/path"] == "/metrics"
    svc = k8s("Service", "arcdiff-api")
    assert [p["port"] for p in svc["spec"]["ports"]] == [API_PORT]

    cw = container(worker)
    assert cw["args"][0] == "worker"
    assert flag(cw["args"], "--metrics-port") == str(WORKER_METRICS_PORT)
    assert {p["containerPort"] for p in cw["ports"]} == {WORKER_METRICS_PORT}
    assert worker["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(WORKER_METRICS_PORT)
    compose_worker = service("worker")["command"]
    assert flags(cw["args"], "--model") == flags(compose_worker, "--model")
    assert flag(cw["args"], "--device") == "cuda:0"
    # $(VAR) in args is expanded by Kubernetes from the container's env
    assert flag(cw["args"], "--redis") == "$(ARCDIFF_REDIS_URL)" == flag(ca["args"], "--redis")


def test_k8s_worker_requests_one_gpu():
    c = container(k8s("Deployment", "arcdiff-worker"))
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1


def appendonly_everysec(cmd: list[str]) -> None:
    """Redis persists every write to its append-only file, fsynced each second."""
    assert flag(cmd, "--appendonly") == "yes" and flag(cmd, "--appendfsync") == "everysec", cmd


def test_compose_redis_persists_to_a_named_volume():
    redis = service("redis")
    appendonly_everysec(redis["command"])
    (mount,) = redis["volumes"]
    volume, path = mount.split(":")[:2]
    assert path == "/data" and volume in COMPOSE["volumes"], "the AOF must live on a named volume"


def test_k8s_redis_and_config():
    redis = k8s("StatefulSet", "redis")
    c = container(redis)
    assert c["image"] == service("redis")["image"]
    assert c["readinessProbe"]["exec"]["command"] == ["redis-cli", "ping"]
    appendonly_everysec(c["args"])
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["spec"]["resources"]["requests"]["storage"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == flag(c["args"], "--dir") == "/data"
    assert redis["spec"]["serviceName"] == "redis" and "volumes" not in redis["spec"]["template"]["spec"]
    svc = k8s("Service", "redis")
    assert [p["port"] for p in svc["spec"]["ports"]] == [6379]
    cfg = k8s("ConfigMap", "arcdiff-config")["data"]
    assert cfg["ARCDIFF_REDIS_URL"] == "redis://redis:6379/0"
    assert cfg["ARCDIFF_WORKER_METRICS_PORT"] == str(WORKER_METRICS_PORT)
    for d in (k8s("Deployment", "arcdiff-api"), k8s("Deployment", "arcdiff-worker")):
        refs = [e["configMapRef"]["name"] for e in container(d)["envFrom"] if "configMapRef" in e]
        assert refs == ["arcdiff-config"]


def test_k8s_keda_scales_workers_on_rq_queue_lists():
    so = k8s("ScaledObject", "arcdiff-worker")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert so["spec"]["scaleTargetRef"]["name"] == "arcdiff-worker"
    assert so["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    # scale to zero: the API stays ready without workers (generations wait in the queue) unless
    # the config asks for the strict readiness, which would take the API out of the Service
    assert so["spec"]["minReplicaCount"] == 0
    cfg = k8s("ConfigMap", "arcdiff-config")["data"]
    assert cfg.get("ARCDIFF_READY_REQUIRES_WORKERS", "false") == "false"
    assert all(t["metadata"]["activationListLength"] == "0" for t in so["spec"]["triggers"])
    assert so["spec"]["maxReplicaCount"] > so["spec"]["minReplicaCount"]
    models = flags(container(k8s("Deployment", "arcdiff-worker"))["args"], "--model")
    lists = []
    for t in so["spec"]["triggers"]:
        assert t["type"] == "redis"
        m = t["metadata"]
        assert m["address"] == "redis.arcdiff.svc.cluster.local:6379"
        assert int(m["listLength"]) > 0 and isinstance(m["listLength"], str)
        lists.append(m["listName"])
    assert lists == [f"rq:queue:arcdiff:{m}{suffix}" for m in models for suffix in ("", ":batch")]


# --------------------------------------------------------------------- dashboard and rules (static)
def test_grafana_dashboard_structure():
    dashes = dashboards()
    assert "arcdiff.json" in dashes
    ds_uid = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"][0]["uid"]
    for name, d in dashes.items():
        assert d.get("uid") and d.get("title") and isinstance(d.get("panels"), list), name
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for p in d["panels"]:
            if p["type"] == "row":
                continue
            assert p.get("targets"), f"{name}: panel {p['title']!r} has no query"
            assert p["datasource"]["uid"] == ds_uid, f"{name}: panel {p['title']!r} uses another datasource"
            g = p["gridPos"]
            assert g["x"] >= 0 and g["x"] + g["w"] <= 24, f"{name}: panel {p['title']!r} overflows the grid"
    titles = " ".join(p["title"].lower() for p in dashes["arcdiff.json"]["panels"])
    for topic in ("images / s", "latency", "queue depth", "batch size", "error", "device memory"):
        assert topic in titles, f"the dashboard has no panel about {topic!r}"


def all_exprs() -> list[tuple[str, str]]:
    out = rule_exprs()
    for d in dashboards().values():
        out += [(w, substitute_grafana_vars(e)) for w, e in dashboard_exprs(d)]
        out += [(w, q) for w, q in dashboard_variable_queries(d)]
    return out


def test_every_metric_in_dashboard_and_rules_is_in_the_contract():
    used = set()
    for where, expr in all_exprs():
        for name in metric_names_in(expr):
            assert name in EXPOSED, f"{where}: {name} is not a contract metric series ({expr})"
            used.add(EXPOSED[name])
    assert set(CONTRACT) - used == set(), f"contract metrics no panel or rule shows: {sorted(set(CONTRACT) - used)}"


ALL_LABELS = {lab for _, labels in CONTRACT.values() for lab in labels} | {"le", "job", "instance"}


@pytest.mark.parametrize("where,expr", all_exprs())
def test_expressions_use_contract_label_names(where, expr):
    # a misspelt label in a =~".*" matcher or a `by` clause would still return data
    for m in re.finditer(r"(arcdiff_[a-z0-9_]+)\{([^}]*)\}", expr):
        name = EXPOSED[m.group(1)]
        labels = {kv.split("=")[0].strip(" !~") for kv in m.group(2).split(",") if kv.strip()}
        extra = {"le"} if CONTRACT[name][0] == "histogram" else set()
        assert labels <= set(CONTRACT[name][1]) | extra | {"job", "instance"}, f"{where}: {labels} on {name}"
    for m in re.finditer(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        labels = {x.strip() for x in m.group(1).split(",") if x.strip()}
        assert labels <= ALL_LABELS, f"{where}: grouping by unknown labels {labels - ALL_LABELS}"
