"""The Kubernetes manifests against real schemas (no cluster runs here): the core kinds against the
Kubernetes OpenAPI schemas that `kubernetes-validate` carries, in strict mode (an unknown field is
an error), for every minor version from the oldest the docs support to the newest it knows; KEDA's
ScaledObject against KEDA's CRD schema as generated into `cloudcoil-models-keda`'s models, with
unknown fields refused by a round trip."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import kubernetes_validate.utils
import pytest
from deploy_helpers import K8S_DIR, load_yaml_docs

OLDEST = (1, 29)  # docs/deployment.md, "Kubernetes and KEDA"


def versions() -> list[str]:
    known = sorted(
        {tuple(int(x) for x in v.split(".")[:2]) for v in kubernetes_validate.utils.all_versions()},
    )
    return [f"{major}.{minor}.0" for major, minor in known if (major, minor) >= OLDEST]


def manifests() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc)
        for path in sorted(K8S_DIR.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in load_yaml_docs(path)
    ]


CORE = [(name, doc) for name, doc in manifests() if doc["apiVersion"] != "keda.sh/v1alpha1"]
KEDA = [(name, doc) for name, doc in manifests() if doc["apiVersion"] == "keda.sh/v1alpha1"]


def test_there_is_something_to_validate():
    kinds = {doc["kind"] for _, doc in CORE}
    assert {"Deployment", "Service", "StatefulSet", "ConfigMap", "Namespace"} <= kinds, kinds
    assert [doc["kind"] for _, doc in KEDA] == ["ScaledObject"]
    assert len(versions()) >= 2, versions()


@pytest.mark.parametrize("version", versions())
def test_core_manifests_match_the_kubernetes_schema(version):
    for name, doc in CORE:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name} is not a valid {doc['kind']} for Kubernetes {version}: {e.message} at {list(e.path)}")


def test_strict_validation_catches_a_misspelt_field():
    _name, doc = next((n, d) for n, d in CORE if d["kind"] == "Deployment")
    bad = {**doc, "spec": {**doc["spec"], "replica": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, versions()[-1], strict=True)


def keda_round_trip(doc: dict[str, Any]) -> dict[str, Any]:
    from cloudcoil.models.keda.v1alpha1 import ScaledObject

    return ScaledObject.model_validate(doc).model_dump(mode="json", by_alias=True, exclude_unset=True)


def test_scaled_object_matches_kedas_schema():
    for name, doc in KEDA:
        # validation checks the types; the round trip drops whatever the schema does not know
        assert keda_round_trip(doc) == doc, f"{name}: fields KEDA's ScaledObject schema does not have"


def test_keda_check_catches_a_misspelt_field_and_a_wrong_type():
    _, doc = KEDA[0]
    typo = {**doc, "spec": {**doc["spec"], "minReplicaCont": 0}}
    assert keda_round_trip(typo) != typo
    wrong = {**doc, "spec": {**doc["spec"], "minReplicaCount": "zero"}}
    with pytest.raises(ValueError):
        keda_round_trip(wrong)
