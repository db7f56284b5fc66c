"""Artifact round trip, verification, and refusal of tampered or pickled weights."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ddn_node.model.artifact import (
    AbnormalityDef,
    ArtifactError,
    HeadInfo,
    LocalisationRecord,
    Manifest,
    ModelArtifact,
    WeightsModel,
    architecture_of,
    device_uid_from_sha256,
    save_artifact,
)
from ddn_node.model.ddn import DDN, DDNConfig, HeadConfig
from ddn_node.model.inference import Predictor
from ddn_node.model.preprocess import PreprocessSpec
from ddn_node.model.types import AlgorithmInfo, Code, LabelSpec

CFG = DDNConfig(
    backbone="tiny",
    heads=(
        HeadConfig("cxr", ("Effusion", "Mass")),
        HeadConfig("mri", ("glioma", "notumor"), "softmax"),
    ),
)


def _manifest(model: DDN) -> Manifest:
    return Manifest(
        name="t",
        version="2026.01.01-t",
        algorithm_name="DDN test",
        architecture=architecture_of(model.config),
        heads={
            "cxr": HeadInfo(
                activation="sigmoid",
                labels=[
                    LabelSpec("Effusion", Code("60046008", "SCT", "Pleural effusion"), 0.3, "test"),
                    LabelSpec("Mass", Code("309529002", "SCT", "Lung mass"), 0.6, "test"),
                ],
                abnormality=AbnormalityDef(kind="max_probability"),
            ),
            "mri": HeadInfo(
                activation="softmax",
                labels=[
                    LabelSpec("glioma", Code("393563007", "SCT", "Glioma"), 0.5),
                    LabelSpec("notumor", Code("X", "99DDN", "no tumour"), 0.5),
                ],
                abnormality=AbnormalityDef(kind="complement", labels=["notumor"]),
            ),
        },
        preprocess=PreprocessSpec(size=64),
        weights=WeightsModel(sha256="", dtype="float16", n_parameters=0),
    )


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[Path, DDN]:
    torch.manual_seed(0)
    model = DDN(CFG).eval()
    save_artifact(tmp_path / "m", model, _manifest(model))
    return tmp_path / "m", model


def test_round_trip(saved: tuple[Path, DDN]) -> None:
    path, model = saved
    art = ModelArtifact.load(path)
    assert art.name == "t" and art.version == "2026.01.01-t"
    assert set(art.heads) == {"cxr", "mri"}
    labels = art.heads["cxr"].labels
    assert all(isinstance(lab, LabelSpec) for lab in labels)
    assert (
        labels[0].code == Code("60046008", "SCT", "Pleural effusion") and labels[1].threshold == 0.6
    )
    assert art.labels("mri")[1].name == "notumor"
    alg = art.algorithm
    assert (
        isinstance(alg, AlgorithmInfo)
        and alg.is_demo
        and "not for diagnostic use" in alg.intended_use
    )
    assert alg.device_uid == device_uid_from_sha256(art.weights_sha256)
    assert alg.device_uid.startswith("2.25.") and len(alg.device_uid) <= 64
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref, got = model(x), art.model(x)
    # fp16 storage: close, not equal
    assert torch.allclose(ref["cxr"], got["cxr"], atol=2e-2)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["weights"]["dtype"] == "float16" and manifest["weights"]["n_parameters"] > 0


def test_device_uid_changes_with_the_weights(saved: tuple[Path, DDN], tmp_path: Path) -> None:
    path, model = saved
    with torch.no_grad():
        model.heads["cxr"].bias += 1
    save_artifact(tmp_path / "m2", model, _manifest(model))
    assert (
        ModelArtifact.load(path).algorithm.device_uid
        != ModelArtifact.load(tmp_path / "m2").algorithm.device_uid
    )


def test_tampered_weights_are_refused(saved: tuple[Path, DDN]) -> None:
    path, _ = saved
    data = bytearray((path / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        ModelArtifact.load(path)


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (open, (str(_Boom.marker), "w"))  # unpickling would create the marker file

    marker = Path("/nonexistent")


def test_a_pickle_is_never_unpickled_even_with_a_matching_hash(
    saved: tuple[Path, DDN], tmp_path: Path
) -> None:
    path, _ = saved
    marker = tmp_path / "pwned"
    _Boom.marker = marker
    payload = pickle.dumps({"state": _Boom()})
    (path / "weights.safetensors").write_bytes(payload)
    manifest = json.loads((path / "manifest.json").read_text())
    import hashlib

    manifest["weights"]["sha256"] = hashlib.sha256(
        payload
    ).hexdigest()  # attacker fixes the hash too
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError):
        ModelArtifact.load(path)
    assert not marker.exists()


def test_bad_manifests_are_refused(saved: tuple[Path, DDN]) -> None:
    path, _ = saved
    good = json.loads((path / "manifest.json").read_text())
    for change in (
        lambda m: m.update(schema_version=99),
        lambda m: m["heads"]["cxr"]["labels"][0].update(threshold=1.5),
        lambda m: m.update(unexpected="x"),
        lambda m: m["weights"].update(file="../weights.safetensors"),
        lambda m: m["architecture"].update(backbone="resnet18"),
    ):
        bad = json.loads(json.dumps(good))
        change(bad)
        (path / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(ArtifactError):
            ModelArtifact.load(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError):
        ModelArtifact.load(path)
    with pytest.raises(ArtifactError):
        ModelArtifact.load(path.parent / "absent")


def test_predictor_interface_and_abnormality_scores(saved: tuple[Path, DDN]) -> None:
    path, _ = saved
    art = ModelArtifact.load(path)
    p = Predictor(art, device="cpu", threads=0)
    rng = np.random.default_rng(0)
    images = [
        rng.random((50 + 7 * i, 40 + 3 * i)).astype(np.float32) for i in range(19)
    ]  # > one batch of 16
    preds = p.predict(
        images, head="cxr", sop_instance_uids=[f"1.{i}" for i in range(19)], heatmaps=True
    )
    assert len(preds) == 19 and preds[18].sop_instance_uid == "1.18"
    for img, pr in zip(images, preds, strict=True):
        assert set(pr.probabilities) == {"Effusion", "Mass"}
        for name, hm in pr.heatmaps.items():
            assert pr.probabilities[name] >= {"Effusion": 0.3, "Mass": 0.6}[name]
            assert hm.shape == img.shape and hm.dtype == np.float32
            assert float(hm.min()) >= 0 and float(hm.max()) <= 1
    study = p.study_probabilities(preds)
    assert study["Mass"] == max(pr.probabilities["Mass"] for pr in preds)
    assert p.abnormality_score("cxr", {"Effusion": 0.2, "Mass": 0.7}) == pytest.approx(0.7)
    assert p.abnormality_score("mri", {"glioma": 0.9, "notumor": 0.1}) == pytest.approx(0.9)
    mri = p.predict(images[:2], head="mri", heatmaps=False)
    assert sum(mri[0].probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(KeyError):
        p.predict(images[:1], head="nope")
    with pytest.raises(ValueError):
        p.predict(images[:2], head="cxr", sop_instance_uids=["only-one"])


def test_every_bundled_label_has_a_code_and_a_source() -> None:
    from ddn_node.model.codes import CODE_SOURCES, KNOWN_CODES, code_for
    from ddn_node.training.data import NIH_LABELS

    for lab in (*NIH_LABELS, "glioma", "meningioma", "notumor", "pituitary"):
        code = code_for(lab)
        assert code.scheme in ("SCT", "DCM", "99DDN") and code.value and code.meaning
        assert CODE_SOURCES[lab]
    assert code_for("Something New").scheme == "99DDN"
    assert KNOWN_CODES["Effusion"].value == "60046008"


# --- localisation evidence (which labels get heat maps) ----------------------------------


def _record_for(sha: str) -> LocalisationRecord:
    from ddn_node.model.artifact import (
        LabelLocalisation,
        LocalisationRule,
        PartLocalisation,
    )

    good = PartLocalisation(
        n_boxes=20,
        n_images=20,
        n_patients=18,
        hits=15,
        pointing_game=0.75,
        ci95=(0.53, 0.89),
        n_effective=17.5,
        random=0.05,
        centre=0.2,
    )
    poor = PartLocalisation(
        n_boxes=12,
        n_images=12,
        n_patients=12,
        hits=1,
        pointing_game=1 / 12,
        ci95=(0.01, 0.35),
        n_effective=12,
        random=0.04,
        centre=0.5,
    )
    return LocalisationRecord(
        rule=LocalisationRule(kind="ci_lower_bound", min_boxes=5, decided_on="val"),
        weights_sha256=sha,
        labels={
            "Effusion": LabelLocalisation(
                maps_shown=True,
                reason="beats random 0.05 and centre 0.20 ...",
                parts={"val": good, "test": poor},
            ),
            "Mass": LabelLocalisation(
                maps_shown=False, reason="below the centre prior ...", parts={"val": poor}
            ),
        },
    )


def _with_record(path: Path, sha: str) -> None:
    from ddn_node.model.artifact import read_manifest, write_manifest

    m = read_manifest(path)
    heads = dict(m.heads)
    heads["cxr"] = heads["cxr"].model_copy(update={"localisation": _record_for(sha)})
    write_manifest(path, m.model_copy(update={"heads": heads}))


def test_localisation_evidence_round_trips_through_the_manifest(saved: tuple[Path, DDN]) -> None:
    from ddn_node.model.artifact import LocalisationEvidence

    path, _ = saved
    sha = ModelArtifact.load(path).weights_sha256
    _with_record(path, sha)
    raw = json.loads((path / "manifest.json").read_text())
    rec = raw["heads"]["cxr"]["localisation"]
    assert rec["rule"]["decided_on"] == "val" and rec["labels"]["Effusion"]["parts"]["val"][
        "ci95"
    ] == [0.53, 0.89]
    art = ModelArtifact.load(path)
    ev = art.localisation("cxr")
    assert set(ev) == {"Effusion", "Mass"} and all(
        isinstance(e, LocalisationEvidence) for e in ev.values()
    )
    eff = ev["Effusion"]
    assert eff.shown and eff.recorded and eff.split == "val"
    assert eff.pointing_game == 0.75 and eff.ci == (0.53, 0.89) and eff.n_boxes == 20
    assert eff.random == 0.05 and eff.centre == 0.2 and eff.parts["test"].n_boxes == 12
    assert not ev["Mass"].shown and "centre prior" in ev["Mass"].reason
    with pytest.raises(AttributeError):
        eff.shown = False  # type: ignore[misc]
    assert art.heatmap_labels("cxr") == {"Effusion"}
    assert art.heatmap_labels("cxr", "all") == {"Effusion", "Mass"}
    assert art.heatmap_labels("cxr", "none") == frozenset()
    with pytest.raises(ValueError, match="policy"):
        art.heatmap_labels("cxr", "some")
    # The other head has no record: evidence unknown, no maps.
    assert art.heatmap_labels("mri") == frozenset()
    # Writing the manifest back keeps the record (what `evaluate --record-in-manifest` relies on).
    from ddn_node.model.artifact import write_manifest

    write_manifest(path, art.manifest)
    assert ModelArtifact.load(path).localisation("cxr") == ev


def test_a_manifest_without_the_record_loads_and_withholds_maps(saved: tuple[Path, DDN]) -> None:
    path, _ = saved
    raw = json.loads((path / "manifest.json").read_text())
    for h in raw["heads"].values():
        h.pop("localisation", None)  # a manifest written before the record existed
    (path / "manifest.json").write_text(json.dumps(raw))
    art = ModelArtifact.load(path)
    for head in ("cxr", "mri"):
        ev = art.localisation(head)
        assert set(ev) == set(art.head(head).label_names)
        for e in ev.values():
            assert not e.shown and not e.recorded and e.pointing_game is None and e.n_boxes == 0
            assert "no localisation evidence" in e.reason
        assert art.heatmap_labels(head) == frozenset()
        # "all" is every finding; the mri head's normal class (notumor) is none.
        expected = set(art.head(head).label_names) - {"notumor"}
        assert art.heatmap_labels(head, "all") == expected


def test_evidence_recorded_for_other_weights_is_not_used(saved: tuple[Path, DDN]) -> None:
    path, _ = saved
    _with_record(path, "0" * 64)
    art = ModelArtifact.load(path)
    ev = art.localisation("cxr")
    assert not any(e.shown for e in ev.values())
    assert all("other weights" in e.reason for e in ev.values())
    assert art.heatmap_labels("cxr") == frozenset()
