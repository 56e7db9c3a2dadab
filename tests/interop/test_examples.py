"""The Kubernetes examples (config/examples/kubernetes-*.yaml) hold together.

Each manifest embeds a keygate config in a ConfigMap, so `cargo test`'s check of the .toml
examples never sees it. These tests read each manifest as Kubernetes would and check that the
pieces agree: the readiness probe asks keygate's probe path, the pod's grace period outlasts
keygate's drain, the config passes `keygate check` with the variables the pod sets, the check
names the keys without printing them, and a config that shares its limits through Redis
reaches the manifest's Redis with the password that Redis requires.

The binary is env KEYGATE_BIN, default target/debug/keygate in the repo root, as for
test_interop.py.
"""

import os
import re
import secrets
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
EXAMPLES = REPO_ROOT / "config" / "examples"
# Each manifest and the kinds of its documents.
MANIFESTS = {
    "kubernetes-sidecar.yaml": ["ConfigMap", "Deployment", "Secret", "Service"],
    "kubernetes-replicas.yaml": ["ConfigMap", "Deployment", "Deployment", "Secret", "Service", "Service"],
}
CONTAINER = "keygate"
CONFIG_ENTRY = "keygate.toml"
# keygate's defaults for what the config may leave out (src/config.rs).
DEFAULT_PROBE_PATH = "/health"
DEFAULT_SHUTDOWN_GRACE = "30s"
CHECK_TIMEOUT_S = 30
UNIT_SECONDS = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


def keygate_bin() -> Path:
    path = Path(os.environ.get("KEYGATE_BIN", "target/debug/keygate"))
    path = path if path.is_absolute() else REPO_ROOT / path
    if not os.access(path, os.X_OK):
        pytest.fail(f"no keygate binary at {path}: run `cargo build --locked` or set KEYGATE_BIN")
    return path


def seconds(text: str) -> float:
    """A duration as keygate's config writes it: "30s", "5m", "1h 30m", "500ms"."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", text.strip())
    rebuilt = "".join(number + unit for number, unit in parts)
    if not parts or rebuilt != re.sub(r"\s+", "", text) or any(u not in UNIT_SECONDS for _, u in parts):
        raise ValueError(f"cannot read the duration {text!r}")
    return sum(float(number) * UNIT_SECONDS[unit] for number, unit in parts)


def test_duration_reader():
    assert seconds("30s") == 30
    assert seconds("2m") == 120
    assert seconds("1h 30m") == 5400
    assert seconds("500ms") == 0.5
    with pytest.raises(ValueError):
        seconds("30 parsecs")


@pytest.fixture(scope="module", params=sorted(MANIFESTS))
def manifest(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def documents(manifest) -> list[dict]:
    with (EXAMPLES / manifest).open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def only(documents: list[dict], kind: str) -> dict:
    found = [d for d in documents if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def containers(deployment: dict) -> list[dict]:
    return deployment["spec"]["template"]["spec"]["containers"]


def serving(documents: list[dict], service: dict) -> dict:
    """The one Deployment whose pods the Service selects."""
    selector = service["spec"]["selector"].items()
    found = [
        d
        for d in documents
        if d["kind"] == "Deployment" and selector <= d["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert len(found) == 1, f"Service {service['metadata']['name']} selects {len(found)} Deployments"
    return found[0]


@pytest.fixture(scope="module")
def deployment(documents) -> dict:
    found = [d for d in documents if d["kind"] == "Deployment" and any(c["name"] == CONTAINER for c in containers(d))]
    assert len(found) == 1, f"expected one Deployment with a {CONTAINER!r} container, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def pod(deployment) -> dict:
    return deployment["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod) -> dict:
    found = [c for c in pod["containers"] if c["name"] == CONTAINER]
    assert len(found) == 1, f"no container named {CONTAINER!r} in the Deployment"
    return found[0]


@pytest.fixture(scope="module")
def config_text(documents, pod, container) -> str:
    """The keygate.toml the keygate container reads: its --config path, through its volume
    mount, to the ConfigMap."""
    args = container["args"]
    config_path = Path(args[args.index("--config") + 1])
    mounts = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == config_path.parent]
    assert len(mounts) == 1, f"nothing mounted at {config_path.parent} in the keygate container"
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[0]["name"])
    configmap = only(documents, "ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert config_path.name == CONFIG_ENTRY
    return configmap["data"][CONFIG_ENTRY]


@pytest.fixture(scope="module")
def config(config_text) -> dict:
    return tomllib.loads(config_text)


def test_manifest_has_the_documents_it_should(manifest, documents):
    kinds = sorted(d["kind"] for d in documents)
    assert kinds == MANIFESTS[manifest], kinds


def test_readiness_probe_asks_keygates_probe_path(config, container):
    probe_path = config.get("probe", {}).get("path", DEFAULT_PROBE_PATH)
    assert container["readinessProbe"]["httpGet"]["path"] == probe_path


def test_readiness_probe_and_service_reach_keygates_listener(documents, deployment, config, container):
    port = int(config["server"]["listen"].rsplit(":", 1)[1])
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    probe_port = container["readinessProbe"]["httpGet"]["port"]
    assert named.get(probe_port, probe_port) == port
    services = [d for d in documents if d["kind"] == "Service" and serving(documents, d) is deployment]
    assert len(services) == 1, "expected one Service in front of keygate"
    target = services[0]["spec"]["ports"][0]["targetPort"]
    assert named.get(target, target) == port


def test_pod_grace_period_outlasts_keygates_drain(config, pod):
    grace = seconds(config.get("server", {}).get("shutdown_grace", DEFAULT_SHUTDOWN_GRACE))
    assert pod["terminationGracePeriodSeconds"] > grace, (
        f"terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} must exceed "
        f"shutdown_grace ({grace:g} s), or Kubernetes kills streams keygate is still draining"
    )


def variables(template: str) -> set[str]:
    """The environment variables a ${NAME} template uses."""
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", template))


def test_every_variable_the_config_needs_is_set_in_the_container(config, container):
    needed = {k["env"] for k in config["auth"]["keys"] if "env" in k and not k.get("optional")}
    for inject in config.get("inject", []):
        needed |= variables(inject["value"])
    needed |= variables(config.get("limits", {}).get("redis", ""))
    provided = {e["name"] for e in container.get("env", [])}
    assert needed <= provided, f"the keygate container does not set {sorted(needed - provided)}"


def test_embedded_config_passes_keygate_check(config_text, config, tmp_path):
    path = tmp_path / CONFIG_ENTRY
    path.write_text(config_text)
    names = ("API_KEY", "UPSTREAM_API_KEY", "SHARED_SECRET", "REDIS_PASSWORD")
    values = {name: secrets.token_urlsafe(32) for name in names}
    assert all(len(v) == 43 for v in values.values())
    env = {k: v for k, v in os.environ.items() if k not in values and k != "API_KEY_NEXT"}
    result = subprocess.run(
        [keygate_bin(), "check", "--config", path],
        cwd=REPO_ROOT,
        env={**env, **values},
        capture_output=True,
        text=True,
        timeout=CHECK_TIMEOUT_S,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    keys_line = next((line for line in result.stdout.splitlines() if line.startswith("keys:")), None)
    assert keys_line is not None, output
    for key in config["auth"]["keys"]:
        assert key["name"] in keys_line, f"{key['name']!r} is not named: {keys_line}"
    for name, value in values.items():
        assert value not in output, f"keygate check printed the value of {name}"


def test_shared_limits_reach_the_manifests_redis_with_its_password(config, documents, deployment, container):
    url = config.get("limits", {}).get("redis")
    if url is None:
        pytest.skip("this example keeps its limits in each process")
    parts = urlsplit(url)
    service = next((d for d in documents if d["kind"] == "Service" and d["metadata"]["name"] == parts.hostname), None)
    assert service is not None, f"no Service named {parts.hostname!r}, the host of [limits] redis"
    port = service["spec"]["ports"][0]
    assert port["port"] == (parts.port or 6379)
    redis = serving(documents, service)
    assert redis is not deployment, "Redis must be shared, not a container of each replica"
    assert redis["spec"]["replicas"] == 1
    (server,) = containers(redis)
    named = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert named.get(port["targetPort"], port["targetPort"]) == 6379
    # keygate's password is the one Redis requires: the same key of the same Secret.
    (password,) = variables(parts.password or "")
    args = server["args"]
    assert args[args.index("--requirepass") + 1] == f"$({password})"

    def secret_of(c: dict) -> dict:
        return next(e["valueFrom"]["secretKeyRef"] for e in c["env"] if e["name"] == password)

    assert secret_of(server) == secret_of(container)
    assert deployment["spec"]["replicas"] > 1, "an example of shared limits runs several replicas"
