"""Deployment files: Kubernetes manifests against the API schemas, the compose file, the Dockerfile."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from proxy.__main__ import _overrides, _parser
from proxy.config import Config, ConfigError, load_config, require_admin_token, require_incumbent, split_listen

ROOT = Path(__file__).parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
COMPOSE = ROOT / "deploy" / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
CONFIG_PATH = "/etc/shadow-proxy/config.toml"
IMAGE = "shadow-proxy"
# The oldest Kubernetes minor the manifests target (kustomization.yaml says so) and the newest known.
KUBE_VERSIONS = ["1.27.0", kubernetes_validate.latest_version()]


# --- Kubernetes helpers ---------------------------------------------------------------------------


def _manifest_files() -> list[Path]:
    return sorted(p for p in KUBE.glob("*.yaml") if p.name != "kustomization.yaml")


def _load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _resources() -> list[dict[str, Any]]:
    return [doc for path in _manifest_files() for doc in _load(path)]


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [r for r in _resources() if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _deployments() -> list[dict[str, Any]]:
    return [r for r in _resources() if r["kind"] == "Deployment"]


def _pod(deployment: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return pod


def _container(deployment_name: str) -> dict[str, Any]:
    containers = _pod(_one("Deployment", deployment_name))["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _our_image_deployments() -> list[dict[str, Any]]:
    return [d for d in _deployments() if any(c["image"] == IMAGE for c in _pod(d)["containers"])]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def _port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert numbers, f"container {container['name']} has no port named {port}"
    number: int = numbers[0]
    return number


def _configmap_config(tmp_path: Path, environ: dict[str, str] | None = None) -> Config:
    text = _one("ConfigMap", "shadow-proxy-config")["data"]["config.toml"]
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_config(path, environ=environ or {})


def _secret_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's variables that come from a Secret, with the Secret's (placeholder) values."""
    out = {}
    for entry in container.get("env", []):
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            out[entry["name"]] = _one("Secret", ref["name"])["stringData"][ref["key"]]
    return out


def _prestop_sleep(container: dict[str, Any]) -> float:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    return float(command[1])


# --- Kubernetes: schemas and kustomize ------------------------------------------------------------


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.name)
def test_manifest_is_valid_against_the_kubernetes_schemas(path: Path, version: str) -> None:
    """Every resource of the manifest validates strictly (no unknown fields) against the API schema."""
    resources = _load(path)
    assert resources
    for resource in resources:
        kubernetes_validate.validate(resource, version, strict=True)


def test_kustomization_lists_exactly_the_manifests() -> None:
    """kustomization.yaml names every manifest in the directory and nothing that does not exist."""
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in _manifest_files()]


def test_manifests_name_no_namespace() -> None:
    """No resource pins a namespace, so the manifests apply into any namespace."""
    assert all("namespace" not in r["metadata"] for r in _resources())


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_every_resource_with_the_image() -> None:
    """kubectl kustomize renders all resources and gives the shadow-proxy containers a tagged image."""
    result = subprocess.run(["kubectl", "kustomize", str(KUBE)], capture_output=True, text=True, check=True, timeout=60)
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    names = sorted((r["kind"], r["metadata"]["name"]) for r in rendered)
    assert names == sorted((r["kind"], r["metadata"]["name"]) for r in _resources())
    images = {c["image"] for r in rendered if r["kind"] == "Deployment" for c in _pod(r)["containers"]}
    assert {image for image in images if image.startswith(f"{IMAGE}:")}, images
    assert IMAGE not in images, "the kustomization must give the image a tag"


def test_every_resource_is_labelled() -> None:
    """Every resource and pod template carries app.kubernetes.io/name and component."""
    for resource in _resources():
        labelled = [resource["metadata"]]
        if resource["kind"] == "Deployment":
            labelled.append(resource["spec"]["template"]["metadata"])
        for metadata in labelled:
            labels = metadata.get("labels", {})
            assert labels.get("app.kubernetes.io/name") == "shadow-proxy", resource["metadata"]["name"]
            assert labels.get("app.kubernetes.io/component"), resource["metadata"]["name"]


# --- Kubernetes: the config and how pods get it ---------------------------------------------------


def test_configmap_config_is_valid(tmp_path: Path) -> None:
    """The ConfigMap's config.toml loads, with a shared Redis, an open admin port and both upstreams."""
    config = _configmap_config(tmp_path)
    require_incumbent(config)
    assert config.record.redis_url == "redis://redis:6379/0"
    assert config.admin.listen == "0.0.0.0:9901"
    assert config.proxy.workers == 1
    assert "REPLACE" in config.incumbent.url and "REPLACE" in config.candidate[0].url


def test_configmap_redis_url_names_the_redis_service(tmp_path: Path) -> None:
    """The configured Redis host and port are a Service of the manifests."""
    match = re.fullmatch(r"redis://([^:/]+):(\d+)/\d+", _configmap_config(tmp_path).record.redis_url)
    assert match is not None
    service = _one("Service", match.group(1))
    assert int(match.group(2)) in [p["port"] for p in service["spec"]["ports"]]


@pytest.mark.parametrize("name", ["shadow-proxy", "shadow-proxy-comparator"])
def test_config_file_argument_is_the_mounted_configmap(name: str) -> None:
    """The --config path lies in the volume that mounts the ConfigMap holding config.toml."""
    deployment = _one("Deployment", name)
    container = _container(name)
    args = container["args"]
    config_path = args[args.index("--config") + 1]
    volumes = {v["name"]: v for v in _pod(deployment)["volumes"]}
    mounts = [m for m in container["volumeMounts"] if config_path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert len(mounts) == 1
    configmap = volumes[mounts[0]["name"]]["configMap"]["name"]
    relative = config_path[len(mounts[0]["mountPath"].rstrip("/")) + 1 :]
    assert relative in _one("ConfigMap", configmap)["data"]


@pytest.mark.parametrize("variable", ["SHADOW_PROXY_ADMIN_TOKEN", "SHADOW_PROXY_CANARY_FEEDBACK_SECRET"])
def test_proxy_secrets_come_from_the_secret(variable: str) -> None:
    """The admin token and the feedback secret are read from keys of the Secret, never written in the manifests."""
    env = {e["name"]: e for e in _container("shadow-proxy")["env"]}
    ref = env[variable]["valueFrom"]["secretKeyRef"]
    secret = _one("Secret", ref["name"])
    assert ref["key"] in secret["stringData"]
    assert "REPLACE" in secret["stringData"][ref["key"]]
    assert not ref.get("optional"), "serve must not start without it"
    text = _one("ConfigMap", "shadow-proxy-config")["data"]["config.toml"]
    assert "token =" not in text and "feedback_secret =" not in text


def test_proxy_serves_only_with_the_admin_token_of_the_secret(tmp_path: Path) -> None:
    """The ConfigMap's admin listener is on 0.0.0.0: serve refuses it alone and accepts it with the pod's Secret
    variables, which give the admin token and the feedback secret."""
    with pytest.raises(ConfigError, match="admin.token"):
        require_admin_token(_configmap_config(tmp_path))
    environ = _secret_env(_container("shadow-proxy"))
    config = _configmap_config(tmp_path, environ)
    require_admin_token(config)
    assert config.admin.token.get_secret_value() == environ["SHADOW_PROXY_ADMIN_TOKEN"]
    assert config.canary.feedback_secret.get_secret_value() == environ["SHADOW_PROXY_CANARY_FEEDBACK_SECRET"]


def test_pods_disable_service_links() -> None:
    """No pod gets SHADOW_PROXY_*_SERVICE_HOST variables, which the proxy would reject as unknown config."""
    for deployment in _deployments():
        assert _pod(deployment).get("enableServiceLinks") is False, deployment["metadata"]["name"]


# --- Kubernetes: probes, lifecycle, resources, security ------------------------------------------


def test_proxy_probes_hit_healthz_and_readyz_on_the_admin_port(tmp_path: Path) -> None:
    """Liveness and startup probe /healthz, readiness probes /readyz, all on the configured admin port."""
    container = _container("shadow-proxy")
    _, admin_port = split_listen(_configmap_config(tmp_path).admin.listen)
    expected = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe, path in expected.items():
        http = container[probe]["httpGet"]
        assert http["path"] == path, probe
        assert _port_number(container, http["port"]) == admin_port, probe


def test_proxy_exposes_proxy_and_admin_ports(tmp_path: Path) -> None:
    """The proxy container declares the configured proxy and admin ports."""
    config = _configmap_config(tmp_path)
    ports = {p["containerPort"] for p in _container("shadow-proxy")["ports"]}
    assert ports == {split_listen(config.proxy.listen)[1], split_listen(config.admin.listen)[1]}


def test_termination_grace_covers_prestop_and_graceful_shutdown(tmp_path: Path) -> None:
    """The grace period exceeds the preStop sleep plus shutdown, mirror drain and record flush timeouts."""
    config = _configmap_config(tmp_path)
    shutdown = config.proxy.shutdown_timeout + config.shadow.drain_timeout + config.record.flush_timeout
    grace = _pod(_one("Deployment", "shadow-proxy"))["terminationGracePeriodSeconds"]
    prestop = _prestop_sleep(_container("shadow-proxy"))
    assert prestop >= 1
    assert grace > prestop + shutdown


def test_comparator_runs_compare_without_ports() -> None:
    """The comparator container runs the compare command and listens on nothing."""
    container = _container("shadow-proxy-comparator")
    assert container["image"] == IMAGE
    assert container["args"][0] == "compare"
    assert "ports" not in container
    assert "livenessProbe" not in container and "readinessProbe" not in container


def test_replicas_match_the_design() -> None:
    """Three proxies, two comparators, one trial Redis."""
    replicas = {d["metadata"]["name"]: d["spec"]["replicas"] for d in _deployments()}
    assert replicas == {"shadow-proxy": 3, "shadow-proxy-comparator": 2, "redis": 1}


def test_every_container_has_resource_requests_and_limits() -> None:
    """Every container requests and limits CPU and memory."""
    for deployment in _deployments():
        for container in _pod(deployment)["containers"]:
            resources = container["resources"]
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= resources[bound].keys(), (container["name"], bound)


def test_pods_run_as_non_root() -> None:
    """Every pod runs as a non-root UID, without privilege escalation or capabilities."""
    for deployment in _deployments():
        pod = _pod(deployment)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]


def test_shadow_proxy_pods_have_read_only_root_and_a_writable_tmp() -> None:
    """Containers of the image have a read-only root filesystem and an emptyDir on /tmp."""
    deployments = _our_image_deployments()
    assert len(deployments) == 2
    for deployment in deployments:
        volumes = {v["name"]: v for v in _pod(deployment)["volumes"]}
        for container in _pod(deployment)["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert len(tmp) == 1 and "emptyDir" in volumes[tmp[0]["name"]]


def test_deployment_selectors_match_their_pod_templates() -> None:
    """Each Deployment's selector matches its own pod template and no other Deployment's."""
    for deployment in _deployments():
        selector = deployment["spec"]["selector"]["matchLabels"]
        owners = [d for d in _deployments() if _matches(selector, d["spec"]["template"]["metadata"]["labels"])]
        assert owners == [deployment], deployment["metadata"]["name"]


def test_services_select_existing_pods_and_ports() -> None:
    """Every Service selects the pods of exactly one Deployment and targets ports those pods declare."""
    for service in (r for r in _resources() if r["kind"] == "Service"):
        selector = service["spec"]["selector"]
        targets = [d for d in _deployments() if _matches(selector, d["spec"]["template"]["metadata"]["labels"])]
        assert len(targets) == 1, service["metadata"]["name"]
        container = _pod(targets[0])["containers"][0]
        for port in service["spec"]["ports"]:
            _port_number(container, port["targetPort"])


def test_proxy_services_route_to_the_proxy_and_admin_ports() -> None:
    """The proxy Service maps port 80 to 8080, the admin Service maps 9901 to the admin port."""
    container = _container("shadow-proxy")
    proxy = _one("Service", "shadow-proxy")["spec"]["ports"]
    admin = _one("Service", "shadow-proxy-admin")["spec"]["ports"]
    assert [(p["port"], _port_number(container, p["targetPort"])) for p in proxy] == [(80, 8080)]
    assert [(p["port"], _port_number(container, p["targetPort"])) for p in admin] == [(9901, 9901)]


def test_pdb_selects_only_the_proxy_pods() -> None:
    """The PodDisruptionBudget covers the proxy pods and no other workload."""
    pdbs = [r for r in _resources() if r["kind"] == "PodDisruptionBudget"]
    assert len(pdbs) == 1
    spec = pdbs[0]["spec"]
    assert "minAvailable" in spec or "maxUnavailable" in spec
    covered = [
        d["metadata"]["name"]
        for d in _deployments()
        if _matches(spec["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"])
    ]
    assert covered == ["shadow-proxy"]


def test_trial_redis_is_marked_as_not_for_production() -> None:
    """The bundled Redis says it is for trying out and points to a managed Redis for production."""
    text = (KUBE / "redis.yaml").read_text()
    assert "FOR TRYING IT OUT" in text and "production" in text
    assert _one("Deployment", "redis")["spec"]["replicas"] == 1


# --- Compose --------------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return compose


def _interpolate(value: str, environ: dict[str, str] | None = None) -> str:
    """Compose's ${NAME:-default} and ${NAME:?error} (ValueError when NAME is unset or empty)."""

    def one(match: re.Match[str]) -> str:
        name, kind, word = match.groups()
        if (environ or {}).get(name):
            return (environ or {})[name]
        if kind == "?":
            raise ValueError(f"{name}: {word}")
        return str(word)

    return re.sub(r"\$\{(\w+):([-?])([^}]*)\}", one, value)


def _service_config(name: str, tmp_path: Path, shell: dict[str, str] | None = None) -> tuple[list[str], Config]:
    """The command of a compose service and the config it resolves to with the image's default file
    (shell: the variables set where `docker compose` runs)."""
    service = _compose()["services"][name]
    command = [_interpolate(part, shell) for part in service["command"]]
    environ = {key: _interpolate(str(value), shell) for key, value in service.get("environment", {}).items()}
    config_file = tmp_path / "config.toml"
    config_file.write_text(_image_default_config())
    command = [str(config_file) if part == CONFIG_PATH else part for part in command]
    args = _parser().parse_args(command)
    return command, load_config(args.config, environ=environ, overrides=_overrides(args))


def test_compose_runs_redis_proxy_and_comparator() -> None:
    """Compose runs the official Redis image and the proxy and comparator built from the Dockerfile."""
    services = _compose()["services"]
    assert set(services) == {"redis", "proxy", "comparator"}
    assert services["redis"]["image"].startswith("redis:")
    for name in ("proxy", "comparator"):
        build = services[name]["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == ROOT
        assert build["dockerfile"] == "Dockerfile"


def test_compose_proxy_serves_placeholder_upstreams_from_environment(tmp_path: Path) -> None:
    """The proxy serves with --incumbent/--candidate from variables whose defaults are valid URLs."""
    raw = _compose()["services"]["proxy"]["command"]
    assert raw[raw.index("--incumbent") + 1].startswith("${INCUMBENT_URL:-")
    assert raw[raw.index("--candidate") + 1].startswith("${CANDIDATE_URL:-")
    command, config = _service_config("proxy", tmp_path, {"SHADOW_PROXY_ADMIN_TOKEN": "t0ken"})
    assert command[0] == "serve"
    require_incumbent(config)
    assert config.candidate[0].url
    assert config.record.redis_url == "redis://redis:6379/0"
    assert config.admin.listen == "0.0.0.0:9901"


def test_compose_proxy_needs_the_admin_token(tmp_path: Path) -> None:
    """Compose stops when SHADOW_PROXY_ADMIN_TOKEN is not set; when it is, the proxy gets it and may serve."""
    with pytest.raises(ValueError, match="SHADOW_PROXY_ADMIN_TOKEN"):
        _service_config("proxy", tmp_path)
    _, config = _service_config("proxy", tmp_path, {"SHADOW_PROXY_ADMIN_TOKEN": "t0ken"})
    require_admin_token(config)
    assert config.admin.token.get_secret_value() == "t0ken"


def test_compose_comparator_runs_compare_without_healthcheck(tmp_path: Path) -> None:
    """The comparator runs compare against the compose Redis with the image's HEALTHCHECK disabled."""
    command, config = _service_config("comparator", tmp_path)
    assert command[0] == "compare"
    assert config.record.redis_url == "redis://redis:6379/0"
    assert _compose()["services"]["comparator"]["healthcheck"] == {"disable": True}


def test_compose_services_wait_for_a_healthy_redis() -> None:
    """Redis has a healthcheck and the proxy and comparator start once it passes."""
    services = _compose()["services"]
    assert services["redis"]["healthcheck"]["test"]
    for name in ("proxy", "comparator"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_proxy_publishes_admin_on_loopback_only() -> None:
    """The proxy port is published; the admin port only on the host's loopback."""
    ports = [_interpolate(p) for p in _compose()["services"]["proxy"]["ports"]]
    assert "8080:8080" in ports
    assert "127.0.0.1:9901:9901" in ports


# --- Dockerfile -----------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not current):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        keyword, _, rest = (current + line).strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    return instructions


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in _instructions():
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _final(keyword: str) -> list[str]:
    return [args for instruction, args in _stages()[-1] if instruction == keyword]


def _image_default_config() -> str:
    """The config file the final stage writes with printf (one argument per line)."""
    runs = [args for args in _final("RUN") if "printf" in args and CONFIG_PATH in args]
    assert len(runs) == 1
    tokens = shlex.split(runs[0])
    start = tokens.index("printf") + 2
    end = tokens.index(">")
    assert tokens[end + 1] == CONFIG_PATH
    return "\n".join(tokens[start:end]) + "\n"


def test_dockerfile_is_multi_stage() -> None:
    """A builder stage and a runtime stage that copies the built venv from it."""
    stages = _stages()
    assert len(stages) >= 2
    builder = stages[0][0][1].split()[-1]
    assert any(args.startswith(f"--from={builder} ") for args in _final("COPY"))


def test_dockerfile_base_images_are_pinned() -> None:
    """Every base image has an explicit version tag (or digest), never latest or a bare name."""
    defaults = {}
    for instruction, args in _instructions():
        if instruction == "FROM":
            break
        if instruction == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            defaults[name] = value
    stages = set()
    for _, args in (i for i in _instructions() if i[0] == "FROM"):
        words = args.split()
        image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults[m.group(1) or m.group(2)], words[0])
        if image not in stages:
            name, _, tag = image.partition("@")[0].rpartition(":")
            assert "@sha256:" in image or (name and re.match(r"\d", tag)), image
        if len(words) == 3 and words[1].upper() == "AS":
            stages.add(words[2])


def test_dockerfile_runs_as_a_non_root_numeric_user() -> None:
    """The final stage's USER is a numeric UID other than 0."""
    users = _final("USER")
    assert users
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0


def test_dockerfile_healthcheck_probes_healthz_on_the_admin_port(tmp_path: Path) -> None:
    """HEALTHCHECK calls /healthz on the admin port of the image's default config, without curl."""
    (check,) = _final("HEALTHCHECK")
    command = json.loads(check.split(" CMD ", 1)[1])
    assert command[0] == "python" and "curl" not in check
    default = tmp_path / "config.toml"
    default.write_text(_image_default_config())
    _, admin_port = split_listen(load_config(default, environ={}).admin.listen)
    assert "/healthz" in command[-1] and f":{admin_port}" in command[-1]


def test_dockerfile_entrypoint_runs_shadow_proxy_serve() -> None:
    """ENTRYPOINT is shadow-proxy and CMD serves with the image's config file (exec form)."""
    assert [json.loads(args) for args in _final("ENTRYPOINT")] == [["shadow-proxy"]]
    assert [json.loads(args) for args in _final("CMD")] == [["serve", "--config", CONFIG_PATH]]


def test_dockerfile_default_config_listens_on_every_interface(tmp_path: Path) -> None:
    """The config baked into the image is valid and listens on 0.0.0.0 for proxy and admin."""
    path = tmp_path / "config.toml"
    path.write_text(_image_default_config())
    config = load_config(path, environ={})
    assert config.proxy.listen == "0.0.0.0:8080"
    assert config.admin.listen == "0.0.0.0:9901"


def test_dockerfile_default_config_serves_only_with_an_admin_token(tmp_path: Path) -> None:
    """The image's admin listener is on every interface: serve refuses it until SHADOW_PROXY_ADMIN_TOKEN is set."""
    path = tmp_path / "config.toml"
    path.write_text(_image_default_config())
    with pytest.raises(ConfigError, match="admin.token"):
        require_admin_token(load_config(path, environ={}))
    require_admin_token(load_config(path, environ={"SHADOW_PROXY_ADMIN_TOKEN": "t0ken"}))


def test_dockerfile_exposes_proxy_and_admin_ports() -> None:
    """EXPOSE lists the proxy port 8080 and the admin port 9901."""
    exposed = {int(port.split("/")[0]) for args in _final("EXPOSE") for port in args.split()}
    assert exposed == {8080, 9901}


def test_dockerfile_adds_nothing_from_urls() -> None:
    """No ADD fetches a remote URL (unverified downloads)."""
    for instruction, args in _instructions():
        assert not (instruction == "ADD" and re.search(r"(^|\s)https?://", args)), args


def _glob_regex(glob: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: ** spans directories, * and ? stay within one."""
    out, i = "", 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif glob.startswith("**", i):
            out, i = out + ".*", i + 2
        elif glob[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif glob[i] == "?":
            out, i = out + "[^/]", i + 1
        elif glob[i] == "[":
            end = glob.index("]", i)
            out, i = out + glob[i : end + 1], end + 1
        else:
            out, i = out + re.escape(glob[i]), i + 1
    return re.compile(out)


def _dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        regex = _glob_regex(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not pattern.startswith("!")
    return ignored


def test_dockerignore_sends_only_the_package_sources() -> None:
    """The build context holds what COPY needs and never the venv, tests, git data or caches."""
    for needed in ("pyproject.toml", "README.md", "proxy/__main__.py", "proxy/comparator/worker.py"):
        assert not _dockerignored(needed), needed
    unwanted = [".venv/bin/python", "tests/test_deploy.py", "proxy/__pycache__/config.cpython-311.pyc", ".git/HEAD"]
    for path in unwanted:
        assert _dockerignored(path), path


def test_wheel_ships_every_file_of_the_package(tmp_path: Path) -> None:
    """The wheel the image installs holds every module and data file of proxy/ (a real build, inspected)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("shadow_proxy-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name for name in archive.namelist() if name.startswith("proxy/")}
    expected = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "proxy").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert expected - shipped == set(), f"missing from the wheel: {sorted(expected - shipped)}"
