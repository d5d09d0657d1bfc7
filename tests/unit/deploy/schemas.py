"""JSON Schemas for kubeconform, offline: every kind the manifests render, for each
Kubernetes version they must pass.

- Built-in kinds come from the schemas kubernetes-validate bundles (a PyPI package of the
  lock: `kubernetes_validate/kubernetes-json-schema/v<version>-local-strict`, the API's
  own OpenAPI schemas with unknown fields refused). They refer to one shared file of
  definitions by an absolute path, which kubeconform cannot follow; each kind is written
  out standalone instead, with the definitions it reaches copied in.
- Custom resources come from the CRDs vendored in deploy/crds (their served version's
  openAPIV3Schema), made strict the same way: unknown fields refused wherever the schema
  lists the known ones, as `kubectl apply --validate=strict` does.

Files are named the way kubeconform's default schema location names them:
`<kind>-<group prefix>-<version>.json` (`statefulset-apps-v1.json`, `service-v1.json`,
`scaledobject-keda-v1alpha1.json`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from tests.unit.deploy.tools import REPO

CRDS = REPO / "deploy" / "crds"
BUNDLED = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
_SHARED_REF = "/api/_definitions.json#/$defs/"
# A kind refers to the shared file by its path; the definitions refer to each other locally.
_REF = re.compile(r'"\$ref": "(?:/api/_definitions\.json)?#/\$defs/([^"]+)"')


def schema_name(api_version: str, kind: str) -> str:
    """kubeconform's file name for a kind: `apps/v1` StatefulSet -> statefulset-apps-v1.json."""
    group, _, version = api_version.rpartition("/")
    prefix = f"-{group.split('.')[0]}" if group else ""
    return f"{kind.lower()}{prefix}-{version}.json"


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists the known ones (the API
    server would drop them silently)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the served version's openAPIV3Schema, made strict."""
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            if version["served"]:
                key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
                schemas[key] = strict(version["schema"]["openAPIV3Schema"])
    return schemas


def _standalone(text: str, definitions: dict[str, Any]) -> dict[str, Any]:
    """A bundled kind's schema with the definitions it reaches, all referred to locally."""
    wanted: dict[str, Any] = {}
    pending = _REF.findall(text)
    while pending:
        name = pending.pop()
        if name not in wanted:
            wanted[name] = definitions[name]
            pending += _REF.findall(json.dumps(definitions[name]))
    schema = json.loads(text.replace(_SHARED_REF, "#/$defs/"))
    schema["$defs"] = json.loads(json.dumps(wanted).replace(_SHARED_REF, "#/$defs/"))
    return dict(schema)


def write(out: Path, versions: Iterable[str], kinds: Iterable[tuple[str, str]]) -> list[str]:
    """Write the schemas of `kinds` ((apiVersion, kind) pairs) under `out` for each of
    `versions` ("1.33.0"); returns kubeconform's `-schema-location` arguments."""
    custom = crd_schemas()
    (out / "crds").mkdir(parents=True, exist_ok=True)
    for (api_version, kind), schema in custom.items():
        (out / "crds" / schema_name(api_version, kind)).write_text(json.dumps(schema))
    built_in = {k for k in kinds if k not in custom}
    for version in versions:
        source = BUNDLED / f"v{version}-local-strict"
        definitions = json.loads((source / "_definitions.json").read_text())["$defs"]
        target = out / f"v{version}"
        target.mkdir(parents=True, exist_ok=True)
        for api_version, kind in built_in:
            name = schema_name(api_version, kind)
            schema = _standalone((source / name).read_text(), definitions)
            (target / name).write_text(json.dumps(schema))
    return [
        "-schema-location",
        str(
            out / "{{ .NormalizedKubernetesVersion }}" / "{{ .ResourceKind }}{{ .KindSuffix }}.json"
        ),
        "-schema-location",
        str(out / "crds" / "{{ .ResourceKind }}{{ .KindSuffix }}.json"),
    ]
