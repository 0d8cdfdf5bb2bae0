"""deploy/kubernetes without a cluster: every manifest checked against the Kubernetes API schemas
and field names (tests/k8s/validate.mjs, npm packages the bootstrap installs), the security
properties the deployment promises read from what `kubectl apply -k` would send, and every drun
command line in it parsed by drun itself."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
VALIDATE = ROOT / "tests" / "k8s" / "validate.mjs"
NODE = shutil.which("node")
INSTALLED = (ROOT / "tests" / "k8s" / "node_modules" / "kubernetes-models").is_dir()

pytestmark = pytest.mark.skipif((not NODE or not INSTALLED) and not os.environ.get("CI"),
                                reason="node or tests/k8s/node_modules missing (scripts/bootstrap.sh installs them)")


def validate(*paths, render=False):
    args = [NODE, VALIDATE, *(["--render"] if render else []), *map(str, paths)]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def rendered():
    r = validate(DEPLOY, DEPLOY / "examples" / "model-server.yaml", DEPLOY / "examples" / "certificate.yaml",
                 render=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def one(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [d["kind"] for d in docs])
    return found[0]


def test_the_deployment_passes_the_kubernetes_api_schemas():
    r = validate(DEPLOY, DEPLOY / "examples" / "model-server.yaml", DEPLOY / "examples" / "certificate.yaml")
    assert r.returncode == 0, r.stderr
    assert "ok: 7 documents" in r.stderr


def test_least_privilege_and_the_wiring_between_the_pieces():
    docs = rendered()
    ds = one(docs, "DaemonSet", "drun")
    assert ds["metadata"]["namespace"] == "drun"
    pod = ds["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    (server,) = pod["containers"]
    sc = server["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert server["image"] == "registry.example.com/drun:0.1"  # the kustomization's images applied
    # The one root step adds only what handing files over takes.
    (init,) = pod["initContainers"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]}
    assert init["securityContext"]["allowPrivilegeEscalation"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["node-key"]["secret"]["defaultMode"] == 0o400
    assert volumes["peer-tls"]["secret"]["defaultMode"] == 0o400
    assert volumes["run"]["emptyDir"]["medium"] == "Memory"  # keys never on the node's disk
    assert all(m.get("readOnly") for m in server["volumeMounts"] if m["name"] == "run")
    # Peers find each other through the headless Service; the policy admits only them (and loaders).
    labels = ds["spec"]["template"]["metadata"]["labels"]
    svc = one(docs, "Service", "drun-peers")
    assert svc["spec"]["clusterIP"] == "None"
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    np = one(docs, "NetworkPolicy")
    assert all(labels.get(k) == v for k, v in np["spec"]["podSelector"]["matchLabels"].items())
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert sorted(p["port"] for rule in np["spec"]["ingress"] for p in rule["ports"]) == sorted(ports.values())
    # Prometheus scrapes the port drun serves /metrics on.
    ann = ds["spec"]["template"]["metadata"]["annotations"]
    args = server["args"]
    assert ann["prometheus.io/scrape"] == "true"
    assert args[args.index("--metrics-listen") + 1].endswith(f":{ann['prometheus.io/port']}")
    assert args[args.index("--listen") + 1].endswith(f":{ports['peer']}")
    # The loader names the Service its peers' certificate is for.
    loader = one(docs, "Deployment", "llm-server")["spec"]["template"]
    assert loader["metadata"]["labels"]["drun.dev/loader"] == "true"
    fetch = next(c for c in loader["spec"]["initContainers"] if c["name"] == "fetch-model")["args"]
    name = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"
    assert fetch[fetch.index("--peer-server-name") + 1] == name
    assert fetch[fetch.index("--peers-dns") + 1] == f"{name}:{svc['spec']['ports'][0]['port']}"
    assert one(docs, "Certificate")["spec"]["dnsNames"] == [name]


def test_drun_parses_every_command_line_of_the_deployment(drun):
    """Each drun invocation in the manifests gets past drun's own option parser: it fails, here,
    only on the files that exist in a pod and not on this machine."""
    docs = rendered()
    lines = []
    for d in docs:
        spec = d.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            if c.get("image", "").split("/")[-1].startswith("drun") and c.get("args"):
                lines.append(c["args"])
    assert len(lines) == 2  # drun serve, and the loader's drun fetch
    for args in lines:
        r = drun(*args, timeout=30)
        assert r.rc != 0
        for bad in ("unknown option", "usage:", "must be", "give "):
            assert bad not in r.err, r


def test_a_misspelt_field_a_wrong_type_and_an_unchecked_kustomize_field_are_findings(tmp_path):
    bad = tmp_path / "k"
    shutil.copytree(DEPLOY, bad)
    ds = bad / "daemonset.yaml"
    ds.write_text(ds.read_text().replace("readOnlyRootFilesystem: true", "readOnlyRootFilesytem: true", 1)
                  .replace("containerPort: 7443", 'containerPort: "7443"'))
    r = validate(bad)
    assert r.returncode == 1
    assert 'unknown field "readOnlyRootFilesytem"' in r.stderr
    assert "containerPort must be integer" in r.stderr
    (bad / "kustomization.yaml").write_text((bad / "kustomization.yaml").read_text() + "patches:\n  - path: x.yaml\n")
    r = validate(bad)
    assert 'kustomization field "patches"' in r.stderr
    # A kind the API does not have.
    (tmp_path / "x.yaml").write_text("apiVersion: apps/v1\nkind: DeamonSet\nmetadata: {name: x}\n")
    r = validate(tmp_path / "x.yaml")
    assert r.returncode == 1 and "is not a Kubernetes API type" in r.stderr
