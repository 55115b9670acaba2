"""The cluster deployment files in deploy/compose and deploy/kubernetes: parsed and checked
for the mistakes that would break or weaken a real deployment (no cluster runs here).

Kubernetes: every object is named and namespaced; every container is locked down and its
image pinned; every Secret a pod names exists with the key it asks for, and holds only
placeholders; the Services, probes and Ray settings match what Bastion and Ray really
listen on. The NetworkPolicies are evaluated, as a CNI would, against the pods the
manifests define: who may open a connection to whom, on which port.

Compose: every service has an image, every secret is declared, the networks keep the
stores away from the Ray nodes, and the load balancer configs name the real gateways.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import re
import sys
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from bastion.api.health import probes
from bastion.crypto.master_key import FORMAT_HEADER

ROOT = Path(__file__).resolve().parents[3]
KUBERNETES = ROOT / "deploy" / "kubernetes"
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
SECCOMP_PROFILE = COMPOSE_DIR / "seccomp" / "ray-node.json"
# The one container allowed a seccomp profile of its own: it runs bubblewrap.
RAY_NODE_PROFILE = "profiles/bastion-ray-node.json"

Doc = dict[str, Any]
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "RuntimeClass"}
WORKLOADS = {"Deployment", "StatefulSet", "Job", "RayCluster"}
PROBE_PATHS = {route.path for route in probes}


# ---------------------------------------------------------------- loading


@cache
def manifests() -> tuple[Doc, ...]:
    docs: list[Doc] = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None and doc.get("kind") != "Kustomization":
                docs.append(doc)
    return tuple(docs)


def of_kind(kind: str) -> list[Doc]:
    return [d for d in manifests() if d["kind"] == kind]


def one(kind: str, name: str, namespace: str | None = None) -> Doc:
    found = [
        d
        for d in of_kind(kind)
        if d["metadata"]["name"] == name
        and (namespace is None or d["metadata"].get("namespace") == namespace)
    ]
    assert len(found) == 1, (kind, name, namespace)
    return found[0]


@dataclass(frozen=True)
class Template:
    """One pod template of a workload: where it runs and what it is."""

    owner: str
    namespace: str
    spec: Doc
    labels: Mapping[str, str]

    def containers(self) -> list[Doc]:
        return [*self.spec.get("initContainers", []), *self.spec["containers"]]

    def container(self, name: str) -> Doc:
        found: list[Doc] = [c for c in self.spec["containers"] if c["name"] == name]
        assert len(found) == 1, name
        return found[0]


def kuberay_labels(cluster: str, group: str, node_type: str) -> dict[str, str]:
    """The labels KubeRay adds to the pods it makes for a RayCluster."""
    return {
        "ray.io/cluster": cluster,
        "ray.io/group": group,
        "ray.io/node-type": node_type,
        "ray.io/is-ray-node": "yes",
        "app.kubernetes.io/created-by": "kuberay-operator",
    }


@cache
def templates() -> tuple[Template, ...]:
    found = []
    for doc in manifests():
        kind, meta = doc["kind"], doc["metadata"]
        owner = f"{kind}/{meta['name']}"
        if kind in {"Deployment", "StatefulSet", "Job"}:
            tpl = doc["spec"]["template"]
            labels = tpl["metadata"]["labels"]
            found.append(Template(owner, meta["namespace"], tpl["spec"], labels))
        elif kind == "RayCluster":
            head = doc["spec"]["headGroupSpec"]["template"]
            labels = head["metadata"]["labels"] | kuberay_labels(meta["name"], "headgroup", "head")
            found.append(Template(f"{owner}/head", meta["namespace"], head["spec"], labels))
            for group in doc["spec"]["workerGroupSpecs"]:
                tpl = group["template"]
                extra = kuberay_labels(meta["name"], group["groupName"], "worker")
                labels = tpl["metadata"]["labels"] | extra
                found.append(
                    Template(
                        f"{owner}/{group['groupName']}", meta["namespace"], tpl["spec"], labels
                    )
                )
    return tuple(found)


def template(component: str) -> Template:
    (found,) = [t for t in templates() if t.labels.get("app.kubernetes.io/component") == component]
    return found


def env_of(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


def env_value(container: Doc, name: str) -> str:
    value: str = env_of(container)[name]["value"]
    return value


def mount_at(tpl: Template, container: Doc, path: str) -> tuple[Doc, Doc]:
    """(volumeMount, volume) of the container's mount at exactly `path`."""
    (mount,) = [m for m in container.get("volumeMounts", []) if m["mountPath"] == path]
    (volume,) = [v for v in tpl.spec["volumes"] if v["name"] == mount["name"]]
    return mount, volume


@cache
def compose() -> Doc:
    loaded: Doc = yaml.safe_load(COMPOSE.read_text())
    return loaded


def services() -> dict[str, Doc]:
    found: dict[str, Doc] = compose()["services"]
    return found


def gateway_services() -> dict[str, Doc]:
    return {name: s for name, s in services().items() if name.startswith("gateway-")}


# ---------------------------------------------------------------- label selectors


def selects(selector: Doc | None, labels: Mapping[str, str]) -> bool:
    """Whether a LabelSelector (matchLabels and matchExpressions) matches these labels."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
        assert operator in {"In", "NotIn", "Exists", "DoesNotExist"}, operator
    return True


def test_the_selector_evaluator() -> None:
    labels = {"app": "x", "tier": "web"}
    assert selects({}, labels)
    assert selects({"matchLabels": {"app": "x"}}, labels)
    assert not selects({"matchLabels": {"app": "y"}}, labels)
    assert selects(
        {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["web"]}]}, labels
    )
    assert not selects(
        {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["web"]}]}, labels
    )
    assert selects({"matchExpressions": [{"key": "app", "operator": "Exists"}]}, labels)
    assert not selects({"matchExpressions": [{"key": "x", "operator": "Exists"}]}, labels)
    assert not selects(None, labels)


# ---------------------------------------------------------------- network policies


@dataclass(frozen=True)
class Pod:
    """A pod as a NetworkPolicy sees it: namespace, labels, named ports; or, with `ip`,
    an address outside the cluster."""

    name: str
    namespace: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    ports: Mapping[str, int] = field(default_factory=dict)
    ip: str | None = None


def namespace_labels() -> dict[str, dict[str, str]]:
    # Kubernetes labels every namespace with its own name.
    found = {"kube-system": {"kubernetes.io/metadata.name": "kube-system"}}
    for ns in of_kind("Namespace"):
        name = ns["metadata"]["name"]
        found[name] = ns["metadata"].get("labels", {}) | {"kubernetes.io/metadata.name": name}
    return found


def pod_of(component: str) -> Pod:
    tpl = template(component)
    ports = {
        p["name"]: p["containerPort"] for c in tpl.spec["containers"] for p in c.get("ports", [])
    }
    return Pod(component, tpl.namespace, tpl.labels, ports)


DNS = Pod("kube-dns", "kube-system", {"k8s-app": "kube-dns"}, {"dns": 53})
INTERNET = Pod("internet", ip="203.0.113.7")
ADMIN_TOOL = Pod("admin-tool", "ops", {"app": "admin-tool"})
# A pod that someone else runs in Bastion's namespaces, labelled like nothing of Bastion's.
STRANGERS = (
    Pod("stranger", "bastion", {"app": "debug"}),
    Pod("stranger-ray", "bastion-ray", {"app": "debug"}),
    Pod("elsewhere", "default", {"app.kubernetes.io/component": "gateway"}),
)


def _peer_admits(peer: Doc, policy_ns: str, other: Pod) -> bool:
    if "ipBlock" in peer:
        if other.ip is None:
            return False
        address = ipaddress.ip_address(other.ip)
        block = peer["ipBlock"]
        inside = address in ipaddress.ip_network(block["cidr"])
        return inside and not any(
            address in ipaddress.ip_network(e) for e in block.get("except", [])
        )
    if other.ip is not None:
        return False
    if "namespaceSelector" in peer:
        ns_labels = namespace_labels().get(other.namespace, {})
        if not selects(peer["namespaceSelector"], ns_labels):
            return False
    elif other.namespace != policy_ns:
        return False
    return "podSelector" not in peer or selects(peer["podSelector"], other.labels)


def _port_admits(rule: Doc, target: Pod, port: int, protocol: str) -> bool:
    if not rule.get("ports"):
        return True
    for entry in rule["ports"]:
        if entry.get("protocol", "TCP") != protocol:
            continue
        if "port" not in entry:
            return True
        first = entry["port"]
        if isinstance(first, str):
            first = target.ports.get(first, -1)
        if first <= port <= entry.get("endPort", first):
            return True
    return False


def _policies_on(pod: Pod, direction: str) -> list[Doc]:
    return [
        p
        for p in of_kind("NetworkPolicy")
        if p["metadata"]["namespace"] == pod.namespace
        and pod.ip is None
        and selects(p["spec"]["podSelector"], pod.labels)
        and direction in p["spec"].get("policyTypes", ["Ingress"])
    ]


def _admits(
    pod: Pod, direction: str, other: Pod, port_owner: Pod, port: int, protocol: str
) -> bool:
    """Whether the policies on `pod` admit this connection in `direction` (a pod no policy
    selects for that direction is not isolated: everything is admitted)."""
    if pod.ip is not None:
        return True  # outside the cluster: no NetworkPolicy there
    policies = _policies_on(pod, direction)
    if not policies:
        return True
    key, peers = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for policy in policies:
        for rule in policy["spec"].get(key) or []:
            peer_ok = not rule.get(peers) or any(
                _peer_admits(peer, policy["metadata"]["namespace"], other) for peer in rule[peers]
            )
            if peer_ok and _port_admits(rule, port_owner, port, protocol):
                return True
    return False


def can_connect(source: Pod, target: Pod, port: int, protocol: str = "TCP") -> bool:
    """Egress from the source and ingress to the target must both admit the connection."""
    return _admits(source, "Egress", target, target, port, protocol) and _admits(
        target, "Ingress", source, target, port, protocol
    )


def test_the_policy_evaluator_on_a_small_case() -> None:
    web = Pod("web", "bastion", {"app.kubernetes.io/component": "gateway"}, {"https": 8000})
    assert not _port_admits({"ports": [{"port": 1, "endPort": 10}]}, web, 11, "TCP")
    assert _port_admits({"ports": [{"port": "https"}]}, web, 8000, "TCP")
    assert not _port_admits({"ports": [{"port": 53, "protocol": "UDP"}]}, web, 53, "TCP")
    assert _peer_admits({"ipBlock": {"cidr": "203.0.113.0/24"}}, "bastion", INTERNET)
    assert not _peer_admits(
        {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["203.0.113.0/24"]}}, "bastion", INTERNET
    )
    # A podSelector alone means the policy's own namespace.
    assert not _peer_admits({"podSelector": {}}, "bastion", STRANGERS[2])


def test_every_policy_selects_pods_that_exist() -> None:
    pods = [pod_of(t.labels["app.kubernetes.io/component"]) for t in templates()]
    for policy in of_kind("NetworkPolicy"):
        ns = policy["metadata"]["namespace"]
        name = policy["metadata"]["name"]
        assert any(
            p.namespace == ns and selects(policy["spec"]["podSelector"], p.labels) for p in pods
        ), name
        # Every peer that names pods names pods that exist (or kube-dns, which the cluster
        # runs); a bare namespaceSelector admits namespaces the operator labels.
        for rule in [*(policy["spec"].get("ingress") or []), *(policy["spec"].get("egress") or [])]:
            for peer in [*rule.get("from", []), *rule.get("to", [])]:
                if "podSelector" not in peer:
                    continue
                assert any(_peer_admits(peer, ns, p) for p in [*pods, DNS]), (name, peer)


def test_both_namespaces_deny_by_default() -> None:
    for ns in ("bastion", "bastion-ray"):
        policy = one("NetworkPolicy", "default-deny", ns)
        assert policy["spec"]["podSelector"] == {}
        assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        assert "ingress" not in policy["spec"] and "egress" not in policy["spec"]
    # ... so every pod template is isolated both ways.
    for tpl in templates():
        pod = pod_of(tpl.labels["app.kubernetes.io/component"])
        assert _policies_on(pod, "Ingress") and _policies_on(pod, "Egress"), tpl.owner


def test_only_ray_worker_pods_reach_a_gateways_worker_port() -> None:
    gateway, worker, head = pod_of("gateway"), pod_of("ray-worker"), pod_of("ray-head")
    assert gateway.ports["worker"] == 7443
    assert can_connect(worker, gateway, 7443)
    others = [head, pod_of("postgres"), pod_of("redis"), pod_of("migrate"), INTERNET, *STRANGERS]
    for other in others:
        assert not can_connect(other, gateway, 7443), other.name
    # A worker pod reaches nothing else of the gateway.
    assert not can_connect(worker, gateway, 8000)
    assert not can_connect(worker, gateway, 9443)


def test_ray_worker_pods_admit_ray_pods_only() -> None:
    worker, head = pod_of("ray-worker"), pod_of("ray-head")
    for port in (6380, 7443, 10001, 12345):
        assert can_connect(head, worker, port)
        assert can_connect(worker, worker, port)
        for other in [pod_of("gateway"), pod_of("postgres"), INTERNET, *STRANGERS]:
            assert not can_connect(other, worker, port), (other.name, port)


def test_ray_worker_pods_reach_nothing_outside_the_ray_cluster_but_their_gateway() -> None:
    worker = pod_of("ray-worker")
    assert can_connect(worker, DNS, 53, "UDP")
    assert can_connect(worker, pod_of("ray-head"), 6379)
    for target, port in [
        (INTERNET, 443),
        (INTERNET, 80),
        (pod_of("postgres"), 5432),
        (pod_of("redis"), 6379),
        (Pod("api", "default", {"app": "api"}), 443),
    ]:
        assert not can_connect(worker, target, port), target.name


def test_only_gateways_reach_the_ray_client_port() -> None:
    head = pod_of("ray-head")
    assert head.ports["client"] == 10001
    assert can_connect(pod_of("gateway"), head, 10001)
    for other in [
        pod_of("ray-worker"),
        pod_of("migrate"),
        pod_of("postgres"),
        INTERNET,
        *STRANGERS,
    ]:
        assert not can_connect(other, head, 10001), other.name
    # The gateways reach the head on that port only.
    assert not can_connect(pod_of("gateway"), head, 6379)


def test_only_bastion_reaches_postgres_and_redis() -> None:
    postgres, redis = pod_of("postgres"), pod_of("redis")
    for component in ("gateway", "migrate", "init"):
        assert can_connect(pod_of(component), postgres, 5432), component
    assert can_connect(pod_of("gateway"), redis, 6379)
    for other in [pod_of("ray-worker"), pod_of("ray-head"), INTERNET, *STRANGERS]:
        assert not can_connect(other, postgres, 5432), other.name
        assert not can_connect(other, redis, 6379), other.name
    assert not can_connect(pod_of("migrate"), redis, 6379)
    # Only on their own ports, and the stores reach nothing.
    assert not can_connect(pod_of("gateway"), postgres, 22)
    assert not can_connect(postgres, INTERNET, 443)
    assert not can_connect(redis, pod_of("gateway"), 8000)


def test_clients_and_admins_reach_the_gateways_listeners(monkeypatch: pytest.MonkeyPatch) -> None:
    gateway = pod_of("gateway")
    assert can_connect(INTERNET, gateway, 8000)
    assert not can_connect(INTERNET, gateway, 9443)
    assert not can_connect(ADMIN_TOOL, gateway, 9443)
    assert can_connect(gateway, DNS, 53, "UDP")
    # Once its namespace carries the admin label, the admin tool reaches the admin port.
    labelled = {"bastion.dev/admin-access": "true", "kubernetes.io/metadata.name": "ops"}
    known = namespace_labels()
    monkeypatch.setattr(
        sys.modules[__name__], "namespace_labels", lambda: known | {"ops": labelled}
    )
    assert can_connect(ADMIN_TOOL, gateway, 9443)
    assert not can_connect(ADMIN_TOOL, gateway, 8001)


# ---------------------------------------------------------------- kubernetes objects


def test_every_object_is_named_and_namespaced() -> None:
    namespaces = {ns["metadata"]["name"] for ns in of_kind("Namespace")}
    assert namespaces == {"bastion", "bastion-ray"}
    seen = set()
    for doc in manifests():
        assert doc.get("apiVersion") and doc.get("kind"), doc
        meta = doc["metadata"]
        assert meta.get("name"), doc
        if doc["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in meta, meta["name"]
        else:
            assert meta.get("namespace") in namespaces, (doc["kind"], meta["name"])
        key = (doc["kind"], meta.get("namespace"), meta["name"])
        assert key not in seen, key
        seen.add(key)
    assert one("RayCluster", "bastion-ray")["apiVersion"] == "ray.io/v1"


def _image_is_pinned(image: str) -> bool:
    name = image.split("@", 1)[0]
    tag = name.rsplit("/", 1)[-1].partition(":")[2]
    return "@sha256:" in image or (bool(tag) and tag != "latest")


def test_every_container_is_locked_down_and_pinned() -> None:
    assert {t.owner.split("/")[0] for t in templates()} == WORKLOADS
    for tpl in templates():
        pod = tpl.spec
        assert pod.get("automountServiceAccountToken") is False, tpl.owner
        for forbidden in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(forbidden), tpl.owner
        assert not any("hostPath" in v for v in pod.get("volumes", [])), tpl.owner
        pod_ctx = pod.get("securityContext", {})
        for container in tpl.containers():
            where = f"{tpl.owner}/{container['name']}"
            ctx = container.get("securityContext", {})
            assert _image_is_pinned(container["image"]), where
            assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, where
            assert ctx.get("allowPrivilegeEscalation") is False, where
            assert ctx.get("readOnlyRootFilesystem") is True, where
            assert ctx.get("privileged") is not True, where
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not ctx.get("capabilities", {}).get("add"), where
            seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile"))
            assert seccomp is not None, where
            if seccomp["type"] == "Localhost":
                # Only where bubblewrap runs, and only Bastion's own profile.
                assert container["name"] == "ray-worker", where
                assert seccomp["localhostProfile"] == RAY_NODE_PROFILE, where
            else:
                assert seccomp["type"] == "RuntimeDefault", where
            assert "resources" in container and container["resources"].get("limits"), where
    # Pod Security Admission: the namespace that holds the secrets enforces `restricted`.
    labels = namespace_labels()
    assert labels["bastion"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_only_the_ray_workers_are_loosened_for_bubblewrap() -> None:
    for tpl in templates():
        for container in tpl.containers():
            unmasked = container.get("securityContext", {}).get("procMount") == "Unmasked"
            assert unmasked == (container["name"] == "ray-worker"), tpl.owner
    worker = template("ray-worker")
    # Unmasked /proc only in a user namespace of the pod's own.
    assert worker.spec["hostUsers"] is False
    assert worker.namespace == "bastion-ray"


def test_every_secret_referenced_exists_with_its_key() -> None:
    secrets = {
        (s["metadata"]["namespace"], s["metadata"]["name"]): {
            *s.get("stringData", {}),
            *s.get("data", {}),
        }
        for s in of_kind("Secret")
    }
    used = set()
    for tpl in templates():
        for container in tpl.containers():
            for variable in container.get("env", []):
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    key = (tpl.namespace, ref["name"])
                    assert key in secrets, (tpl.owner, ref)
                    assert ref["key"] in secrets[key], (tpl.owner, ref)
                    used.add(key)
        for volume in tpl.spec.get("volumes", []):
            if "secret" in volume:
                key = (tpl.namespace, volume["secret"]["secretName"])
                assert key in secrets, (tpl.owner, volume)
                for item in volume["secret"].get("items", []):
                    assert item["key"] in secrets[key], (tpl.owner, item)
                used.add(key)
    assert used == set(secrets), f"unused: {set(secrets) - used}"


def test_secrets_hold_placeholders_only() -> None:
    for secret in of_kind("Secret"):
        assert secret["metadata"]["annotations"]["bastion.dev/placeholder"] == "true"
        assert "data" not in secret, "base64 data could hide a real secret"
        for key, value in secret["stringData"].items():
            assert value.startswith("REPLACE-ME"), (secret["metadata"]["name"], key)


def test_every_mounted_claim_exists() -> None:
    claims = {
        (c["metadata"]["namespace"], c["metadata"]["name"])
        for c in of_kind("PersistentVolumeClaim")
    }
    volumes = {v["metadata"]["name"]: v for v in of_kind("PersistentVolume")}
    for tpl in templates():
        for volume in tpl.spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                key = (tpl.namespace, volume["persistentVolumeClaim"]["claimName"])
                assert key in claims, (tpl.owner, key)
    for claim in of_kind("PersistentVolumeClaim"):
        bound = volumes[claim["spec"]["volumeName"]]
        assert set(claim["spec"]["accessModes"]) <= set(bound["spec"]["accessModes"])


def test_the_gateway_deployment() -> None:
    deployment = one("Deployment", "bastion-gateway", "bastion")
    assert deployment["spec"]["replicas"] == 2
    tpl = template("gateway")
    assert selects(deployment["spec"]["selector"], tpl.labels)
    gateway = tpl.container("gateway")
    env = env_of(gateway)
    for name in (
        "BASTION_DATABASE_URL",
        "BASTION_REDIS_URL",
        "BASTION_CLUSTER",
        "BASTION_WORKER_LISTEN",
        "BASTION_WORKER_ADVERTISE",
        "BASTION_REDIS_FAILURE_POLICY",
    ):
        assert name in env, name
    # Credentials come from Secrets, never inline.
    for name in ("BASTION_DATABASE_URL", "BASTION_REDIS_URL"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    # The worker listener is a declared port, and replicas dial this pod's own address.
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert ports["worker"] == int(env_value(gateway, "BASTION_WORKER_LISTEN").rsplit(":", 1)[1])
    assert env_value(gateway, "BASTION_WORKER_ADVERTISE") == f"$(POD_IP):{ports['worker']}"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert ports["https"] == int(env_value(gateway, "BASTION_PORT"))
    assert ports["admin"] == int(env_value(gateway, "BASTION_ADMIN_LISTEN").rsplit(":", 1)[1])
    # Probes on the routes Bastion really serves (api/health.py).
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        check = gateway[probe]["httpGet"]
        assert check["path"] in PROBE_PATHS, probe
        assert check["port"] in ports or check["port"] in ports.values()
        assert check["scheme"] == "HTTPS"  # the gateway serves TLS (BASTION_TLS_CERT)
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # Draining (BASTION_DRAIN_TIMEOUT_S, 30 s by default) fits in the grace period.
    assert tpl.spec["terminationGracePeriodSeconds"] > 30


def test_each_gateway_reads_the_master_key_from_its_home() -> None:
    for component in ("gateway", "init"):
        tpl = template(component)
        main = tpl.spec["containers"][0]
        home = env_value(main, "BASTION_HOME")
        mount, volume = mount_at(tpl, main, f"{home}/master.key")
        assert mount["readOnly"] is True and mount["subPath"] == "master.key"
        # A copy in memory, made by the init container from the Secret.
        assert volume["emptyDir"]["medium"] == "Memory"
        (copier,) = [c for c in tpl.spec["initContainers"] if c["name"] == "home"]
        script = " ".join(copier["command"])
        assert "install -m 0600" in script
        copy_dir = next(
            m["mountPath"] for m in copier["volumeMounts"] if m["name"] == volume["name"]
        )
        assert f"{copy_dir}/master.key" in script
        secret_mount = next(m for m in copier["volumeMounts"] if m["name"] == "master-key")
        secret_volume = next(v for v in tpl.spec["volumes"] if v["name"] == "master-key")
        assert secret_volume["secret"]["secretName"] == "bastion-master-key"
        assert f"{secret_mount['mountPath']}/master.key" in script
        # The Secret itself is mounted into the init container only.
        assert not any(m["name"] == "master-key" for m in main["volumeMounts"])


def test_the_service_and_disruption_budget_match_the_gateways() -> None:
    tpl = template("gateway")
    declared = {p["name"] for p in tpl.container("gateway")["ports"]} | {
        p["containerPort"] for p in tpl.container("gateway")["ports"]
    }
    for name in ("bastion-gateway", "bastion-gateway-admin"):
        service = one("Service", name, "bastion")
        assert selects({"matchLabels": service["spec"]["selector"]}, tpl.labels)
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in declared, (name, port)
    for service in of_kind("Service"):
        pods = [t for t in templates() if t.namespace == service["metadata"]["namespace"]]
        selected = [
            t for t in pods if selects({"matchLabels": service["spec"]["selector"]}, t.labels)
        ]
        assert len(selected) == 1, service["metadata"]["name"]
    budget = one("PodDisruptionBudget", "bastion-gateway", "bastion")
    assert selects(budget["spec"]["selector"], tpl.labels)
    assert budget["spec"]["minAvailable"] == 1


def test_the_ray_cluster_is_authenticated_encrypted_and_without_a_dashboard() -> None:
    cluster = one("RayCluster", "bastion-ray", "bastion-ray")
    (pinned,) = [
        match[1]
        for d in _project()["dependencies"]
        if (match := re.fullmatch(r"ray(?:\[[\w,-]+\])?==(\S+)", d))
    ]
    assert cluster["spec"]["rayVersion"] == pinned
    head = cluster["spec"]["headGroupSpec"]["rayStartParams"]
    assert head["include-dashboard"] == "false"
    assert head.get("dashboard-host") not in (None, "0.0.0.0")  # KubeRay's default
    assert head["num-cpus"] == "0"  # no model code next to the Ray Client server
    ray_templates = [t for t in templates() if t.owner.startswith("RayCluster/")]
    assert len(ray_templates) == 2
    for tpl in [*ray_templates, template("gateway")]:
        for container in tpl.spec["containers"]:
            env = {k: str(v.get("value")) for k, v in env_of(container).items()}
            assert env["RAY_AUTH_MODE"] == "token", tpl.owner
            assert env["RAY_USE_TLS"] == "1", tpl.owner
            assert "RAY_AUTH_TOKEN" not in env  # the token comes from a file
            for variable in ("RAY_AUTH_TOKEN_PATH", "RAY_TLS_CA_CERT", "RAY_TLS_SERVER_CERT"):
                path = env[variable]
                assert any(
                    path == m["mountPath"] or path.startswith(m["mountPath"] + "/")
                    for m in container["volumeMounts"]
                ), (tpl.owner, variable)
        # Each pod's Ray certificate comes from its init container, which alone sees the
        # CA's key.
        (issuer,) = [c for c in tpl.spec["initContainers"] if c["name"] == "ray-tls"]
        assert issuer["command"] == ["ray-node-cert.sh"]
        assert env_value(issuer, "RAY_TLS_CA_KEY").startswith("/run/secrets/ray-ca/")
        for container in tpl.spec["containers"]:
            key_volume = next(v for v in tpl.spec["volumes"] if v["name"] == "ray-ca")
            assert not any(m["name"] == key_volume["name"] for m in container["volumeMounts"])


def test_the_gateways_dial_the_ray_head_service_kuberay_makes() -> None:
    cluster = one("RayCluster", "bastion-ray", "bastion-ray")
    address = urlsplit(env_value(template("gateway").container("gateway"), "BASTION_CLUSTER"))
    assert address.scheme == "ray"
    assert address.hostname == f"bastion-ray-head-svc.{cluster['metadata']['namespace']}.svc"
    client_port = int(cluster["spec"]["headGroupSpec"]["rayStartParams"]["ray-client-server-port"])
    assert address.port == client_port == pod_of("ray-head").ports["client"]
    # ... and the head's certificate names it.
    issuer = template("ray-head").spec["initContainers"][0]
    assert f"DNS:{address.hostname}" in env_value(issuer, "RAY_TLS_EXTRA_NAMES").split(",")


def test_ray_workers_read_the_bundles_where_the_gateways_keep_them() -> None:
    gateway_home = env_value(template("gateway").container("gateway"), "BASTION_HOME")
    worker = template("ray-worker")
    container = worker.container("ray-worker")
    assert env_value(container, "BASTION_HOME") == gateway_home
    mount, volume = mount_at(worker, container, f"{gateway_home}/bundles")
    assert mount["readOnly"] is True and volume["persistentVolumeClaim"]["readOnly"] is True
    # The two claims are the same share: the home's bundles/ folder, read-only.
    claims = {c["metadata"]["name"]: c for c in of_kind("PersistentVolumeClaim")}
    volumes = {v["metadata"]["name"]: v for v in of_kind("PersistentVolume")}
    home_pv = volumes[claims["bastion-home"]["spec"]["volumeName"]]["spec"]
    bundles_pv = volumes[claims["bastion-bundles"]["spec"]["volumeName"]]["spec"]
    data_mount = next(
        m["mountPath"]
        for m in template("gateway").container("gateway")["volumeMounts"]
        if m["name"] == "data"
    )
    relative = Path(gateway_home).relative_to(data_mount) / "bundles"
    assert bundles_pv["nfs"]["server"] == home_pv["nfs"]["server"]
    assert bundles_pv["nfs"]["path"] == f"{home_pv['nfs']['path']}/{relative}"
    assert bundles_pv["nfs"]["readOnly"] is True
    assert bundles_pv["accessModes"] == ["ReadOnlyMany"]


def test_the_runtime_class_note_is_only_a_comment() -> None:
    lines = (KUBERNETES / "80-runtimeclass.yaml").read_text().splitlines()
    assert not any(yaml.safe_load_all("\n".join(lines)))
    # The commented examples are valid RuntimeClass objects once uncommented.
    start = lines.index("# apiVersion: node.k8s.io/v1")
    example = "\n".join(line.removeprefix("#").removeprefix(" ") for line in lines[start:])
    classes = [doc for doc in yaml.safe_load_all(example) if doc]
    assert {doc["kind"] for doc in classes} == {"RuntimeClass"}
    assert {doc["handler"] for doc in classes} == {"runsc", "kata"}


# ---------------------------------------------------------------- compose


def _project() -> Doc:
    project: Doc = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project


def env_dict(service: Doc) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def secret_targets(service: Doc) -> dict[str, str]:
    """secret name -> the path it is mounted at in the service's containers."""
    found = {}
    for entry in service.get("secrets", []):
        if isinstance(entry, str):
            found[entry] = f"/run/secrets/{entry}"
        else:
            target = entry.get("target", entry["source"])
            found[entry["source"]] = target if target.startswith("/") else f"/run/secrets/{target}"
    return found


def networks_of(service: Doc) -> set[str]:
    networks = service.get("networks", ["default"])
    return set(networks)


def test_every_service_has_a_pinned_image() -> None:
    for name, service in services().items():
        assert _image_is_pinned(service["image"]), name
    assert services()["postgres"]["image"].startswith("postgres:15")
    assert services()["redis"]["image"].startswith("redis:7")
    built = {n for n, s in services().items() if "build" in s}
    assert built == {"migrate", "init", "gateway-1", "gateway-2", "ray-head", "ray-worker"}
    for name in built:
        build = services()[name]["build"]
        assert (COMPOSE_DIR / build["context"] / build["dockerfile"]).resolve() == (
            COMPOSE_DIR / "Dockerfile"
        )


def test_every_secret_referenced_is_declared_as_a_file_in_secrets() -> None:
    declared = compose()["secrets"]
    used = set()
    for name, service in services().items():
        for secret in secret_targets(service):
            assert secret in declared, (name, secret)
            used.add(secret)
        # Every *_FILE setting points at a secret mounted in that service.
        for variable, value in env_dict(service).items():
            if variable.endswith("_FILE"):
                assert value in secret_targets(service).values(), (name, variable)
    assert used == set(declared)
    for secret in declared.values():
        assert secret["file"].startswith("./secrets/"), secret
    ignored = (COMPOSE_DIR / "secrets" / ".gitignore").read_text().split()
    assert ignored[-2:] == ["*", "!.gitignore"]


def test_only_the_gateways_share_a_network_with_the_stores() -> None:
    networks = compose()["networks"]
    stores = networks_of(services()["postgres"]) | networks_of(services()["redis"])
    assert all(networks[n].get("internal") for n in stores)
    for name, service in services().items():
        shared = networks_of(service) & stores
        if name.startswith("gateway-") or name in {"postgres", "redis", "migrate", "init"}:
            assert shared, name
        else:
            assert not shared, name
    assert not networks_of(services()["ray-worker"]) & stores
    assert networks_of(services()["ray-worker"]) == networks_of(services()["ray-head"])
    assert all(networks[n].get("internal") for n in networks_of(services()["ray-worker"]))
    for gateway in gateway_services().values():
        assert networks_of(services()["ray-head"]) <= networks_of(gateway)


def test_no_port_is_published_beyond_the_hosts_loopback() -> None:
    for name, service in services().items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)


def test_the_gateways_settings() -> None:
    assert len(gateway_services()) == 2
    ray_head = services()["ray-head"]
    advertised = set()
    for name, gateway in gateway_services().items():
        env = env_dict(gateway)
        for variable in ("BASTION_DATABASE_URL", "BASTION_REDIS_URL"):
            assert variable in env or f"{variable}_FILE" in env, (name, variable)
        assert env["BASTION_CLUSTER"] == f"ray://{ray_head['hostname']}:10001"
        assert "--ray-client-server-port=10001" in ray_head["command"]
        assert env["BASTION_WORKER_LISTEN"] == "0.0.0.0:7443"
        assert env["BASTION_WORKER_ADVERTISE"] == f"{gateway['hostname']}:7443"
        assert env["BASTION_REDIS_FAILURE_POLICY"] in {"fail_closed", "fail_open"}
        advertised.add(env["BASTION_WORKER_ADVERTISE"])
        # The same master key, mounted where Bastion reads it: the home's master.key.
        targets = secret_targets(gateway)
        assert targets["master-key"] == f"{env['BASTION_HOME']}/master.key"
        assert f"{env['BASTION_HOME']}/bundles" in {v.split(":")[1] for v in gateway["volumes"]}
    assert len(advertised) == 2
    init = services()["init"]
    assert secret_targets(init)["master-key"] == f"{env_dict(init)['BASTION_HOME']}/master.key"
    assert "--cluster" in init["command"]
    assert services()["migrate"]["command"] == ["bastion", "db", "migrate"]
    # The gateways wait for the migrations.
    for gateway in gateway_services().values():
        condition = gateway["depends_on"]["migrate"]["condition"]
        assert condition == "service_completed_successfully"


def test_the_ray_nodes() -> None:
    head, worker = services()["ray-head"], services()["ray-worker"]
    assert "--include-dashboard=false" in head["command"]
    assert "--num-cpus=0" in head["command"]
    assert f"--address={head['hostname']}:6379" in worker["command"]
    for name in ("ray-head", "ray-worker", *gateway_services()):
        env = env_dict(services()[name])
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["RAY_AUTH_TOKEN_PATH"] in secret_targets(services()[name]).values(), name
        assert env["RAY_USE_TLS"] == "1", name
        assert env["RAY_TLS_CA_CERT"] in secret_targets(services()[name]).values(), name
    # The worker node reads the bundles, read-only, at the gateways' path; never the home.
    home = env_dict(services()["gateway-1"])["BASTION_HOME"]
    assert worker["volumes"] == [f"bastion-bundles:{home}/bundles:ro"]
    assert "master-key" not in secret_targets(worker)


def test_every_bastion_container_is_locked_down() -> None:
    for name, service in services().items():
        assert service.get("read_only") is True, name
        assert service.get("cap_drop") == ["ALL"], name
        assert not service.get("cap_add") and not service.get("privileged"), name
        options = service.get("security_opt", [])
        assert "no-new-privileges:true" in options, name
        assert not any(o.startswith("seccomp=unconfined") for o in options), name
        assert service.get("user", "0").split(":")[0] not in {"0", "root"}, name
    loosened = {n for n, s in services().items() if len(s.get("security_opt", [])) > 1}
    assert loosened == {"ray-worker"}


def test_the_ray_worker_seccomp_profile_is_bastions_allow_list_plus_bubblewrap() -> None:
    options = services()["ray-worker"]["security_opt"]
    (profile_option,) = [o for o in options if o.startswith("seccomp=")]
    assert (COMPOSE_DIR / profile_option.removeprefix("seccomp=")).resolve() == SECCOMP_PROFILE
    spec = importlib.util.spec_from_file_location(
        "ray_node_profile", COMPOSE_DIR / "seccomp" / "ray_node_profile.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = json.loads(SECCOMP_PROFILE.read_text())
    assert committed == module.profile(), "regenerate ray-node.json (see ray_node_profile.py)"
    assert committed["defaultAction"] == "SCMP_ACT_ERRNO"
    allowed = {
        n
        for rule in committed["syscalls"]
        for n in rule["names"]
        if rule["action"] == "SCMP_ACT_ALLOW"
    }
    assert {"unshare", "mount", "pivot_root"} <= allowed
    assert not {"ptrace", "bpf", "io_uring_setup", "kexec_load", "init_module"} & allowed


def test_the_load_balancers_name_the_gateways() -> None:
    expected = {f"{name}:{env_dict(s)['BASTION_PORT']}" for name, s in gateway_services().items()}
    nginx = (COMPOSE_DIR / "nginx.conf").read_text()
    assert set(re.findall(r"^\s*server\s+(\S+?:\d+)", nginx, re.MULTILINE)) == expected
    assert re.search(r"^\s*proxy_buffering off;", nginx, re.MULTILINE)  # streaming
    timeout = re.search(r"^\s*proxy_read_timeout (\d+)s;", nginx, re.MULTILINE)
    assert timeout and int(timeout[1]) > 60  # BASTION_REQUEST_TIMEOUT_S
    # No resending of a request a gateway may have started (inference would run twice).
    settings = "\n".join(line.split("#", 1)[0] for line in nginx.splitlines())
    assert "non_idempotent" not in settings
    haproxy = (COMPOSE_DIR / "haproxy.cfg").read_text()
    assert set(re.findall(r"^\s*server \S+ (\S+:\d+) check", haproxy, re.MULTILINE)) == expected
    assert "uri /readyz" in haproxy
    lb = services()["lb"]
    assert set(lb["depends_on"]) == set(gateway_services())
    assert networks_of(lb) == {"front"}


def test_the_image_installs_the_lock_and_runs_unprivileged() -> None:
    dockerfile = (COMPOSE_DIR / "Dockerfile").read_text()
    assert "--require-hashes -r requirements.lock" in dockerfile
    assert "pip install --no-deps --no-build-isolation ." in dockerfile
    assert "bubblewrap" in dockerfile and "libseccomp2" in dockerfile
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim-bookworm$", dockerfile, re.MULTILINE)
    users = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    for source in re.findall(
        r"^COPY (?:--chmod=\S+ )?(?!--from)(.+) \S+$", dockerfile, re.MULTILINE
    ):
        for path in source.split():
            assert (ROOT / path).exists(), path
    # The build context is an allow-list: never the secrets or a home.
    ignore = (COMPOSE_DIR / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1 :][0].startswith("!")
    assert not any(
        "secrets" in line or ".bastion" in line for line in ignore if line.startswith("!")
    )


def test_make_secrets_writes_a_master_key_bastion_reads() -> None:
    script = (COMPOSE_DIR / "make-secrets.sh").read_text()
    assert f"'{FORMAT_HEADER}\\n%s'" in script
    assert "chmod 0600 master.key" in script
    for secret in compose()["secrets"].values():
        name = secret["file"].removeprefix("./secrets/")
        assert re.search(rf"\b{re.escape(name)}\b", script), name


def _lines(path: Path) -> Iterator[str]:
    yield from path.read_text().splitlines()


def test_the_scripts_are_posix_shell() -> None:
    for name in ("make-secrets.sh", "ray-node-cert.sh", "docker-entrypoint.sh"):
        first = next(_lines(COMPOSE_DIR / name))
        assert first == "#!/bin/sh", name
        assert "set -eu" in (COMPOSE_DIR / name).read_text(), name


@pytest.mark.parametrize("path", sorted(p.name for p in KUBERNETES.glob("*.yaml")))
def test_every_manifest_parses(path: str) -> None:
    list(yaml.safe_load_all((KUBERNETES / path).read_text()))
