"""The TID 1500 SR: content read back equals the inputs; supersession; references."""

from __future__ import annotations

import logging

import pytest
from results_factories import (
    LABELS,
    display_for,
    prediction_for,
    roundtrip,
    synthetic_source,
)
from support.sr_reader import read_sr

from ddn_node.dicom.results import SRReference, build_results
from ddn_node.dicom.results.codes import PRESENT, PRIORITY_CODES
from ddn_node.model.types import Code, LabelSpec
from ddn_node.vocabulary import TRIAGE_PRIORITIES, Priority

PROBS = {"Pneumothorax": 0.87, "Effusion": 0.4, "Nodule": 0.05}  # Effusion == threshold


def _groups(sr):
    """The measurement groups (TID 1501) under "Imaging Measurements" (126010, DCM)."""
    (container,) = [
        item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "126010"
    ]
    return container.ContentSequence


def _build(sources, probabilities, **kwargs):
    prediction = prediction_for(sources, probabilities, demo=kwargs.pop("demo", True))
    kwargs.setdefault("priority", "STAT")
    results = build_results(sources, prediction, display_images=display_for(sources), **kwargs)
    return prediction, results


def test_sr_content_reads_back_equal_to_the_inputs(tmp_path) -> None:
    sources = [synthetic_source(), synthetic_source()]
    sources[1].StudyInstanceUID = sources[0].StudyInstanceUID
    per_image = [PROBS, {"Pneumothorax": 0.2, "Effusion": 0.1, "Nodule": 0.01}]
    prediction, results = _build(sources, per_image, priority="HIGH")
    _, stored = roundtrip(results.sr, tmp_path, "sr")

    content = read_sr(stored)
    assert list(content.findings) == [spec.name for spec in LABELS]
    for spec in LABELS:
        finding = content.findings[spec.name]
        assert finding.code == spec.code
        assert finding.probability == pytest.approx(prediction.probabilities[spec.name], abs=1e-9)
        assert finding.threshold == pytest.approx(spec.threshold)
        assert finding.present is (prediction.probabilities[spec.name] >= spec.threshold)
        assert finding.image_probabilities == pytest.approx(
            {img.sop_instance_uid: img.probabilities[spec.name] for img in prediction.images}
        )
        assert set(finding.source_images) == {str(s.SOPInstanceUID) for s in sources}
    # A probability exactly at the threshold is "present" (LabelSpec: "at or above").
    assert content.findings["Effusion"].present is True
    assert content.positive == ["Pneumothorax", "Effusion"]
    assert content.abnormality_score == pytest.approx(prediction.abnormality_score)
    assert content.priority is Priority.HIGH
    assert content.algorithm_name == prediction.algorithm.name
    assert content.algorithm_version == prediction.algorithm.version
    assert content.device_observer_uid == prediction.algorithm.device_uid
    assert content.procedure == Code("399208008", "SCT", "Plain chest X-ray")
    assert set(content.evidence) == {str(s.SOPInstanceUID) for s in sources}
    assert content.predecessors == ()


@pytest.mark.parametrize("priority", TRIAGE_PRIORITIES)
def test_every_priority_is_coded(priority: Priority) -> None:
    source = synthetic_source()
    _, results = _build([source], [PROBS], priority=priority.value.lower())
    assert read_sr(results.sr).priority is priority
    codes = [
        item.ConceptCodeSequence[0].CodeValue
        for group in _groups(results.sr)
        for item in group.ContentSequence
        if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeValue == "260870009"
    ]
    assert codes == [PRIORITY_CODES[priority].value]


def test_sr_document_attributes_and_study_membership() -> None:
    source = synthetic_source()
    _, results = _build([source], [PROBS])
    sr = results.sr
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.Modality == "SR"
    assert sr.SeriesNumber == 9001
    assert sr.SeriesDescription == "DDN AI findings (SR) - NOT FOR DIAGNOSTIC USE"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == (
        "COMPLETE",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    # The private scheme is identified (PS3.3 C.12.1.1.4).
    assert [i.CodingSchemeDesignator for i in sr.CodingSchemeIdentificationSequence] == ["99DDN"]
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    ref = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
        source.SOPClassUID,
        source.SOPInstanceUID,
    )
    content = read_sr(sr)
    assert content.not_for_diagnostic_use
    assert any("NOT FOR DIAGNOSTIC USE" in c for c in content.comments)


def test_clinical_model_has_no_demo_wording() -> None:
    _, results = _build([synthetic_source()], [PROBS], demo=False)
    content = read_sr(results.sr)
    assert content.comments == ()
    assert not content.not_for_diagnostic_use
    assert results.sr.SeriesDescription == "DDN AI findings (SR)"


def test_superseding_sr_points_at_its_predecessor(tmp_path) -> None:
    source = synthetic_source()
    _, first = _build([source], [PROBS], uid_seed="result:1")
    _, second = _build([source], [PROBS], predecessor=first.sr_reference, uid_seed="result:2")
    _, stored = roundtrip(second.sr, tmp_path, "second")

    content = read_sr(stored)
    assert content.predecessors == (SRReference.from_dataset(first.sr),)
    assert second.sr.SOPInstanceUID != first.sr.SOPInstanceUID
    assert second.sr.SeriesInstanceUID != first.sr.SeriesInstanceUID
    item = stored.PredecessorDocumentsSequence[0]
    assert item.StudyInstanceUID == source.StudyInstanceUID
    assert item.ReferencedSeriesSequence[0].SeriesInstanceUID == first.sr.SeriesInstanceUID


def test_predecessor_from_another_study_is_refused() -> None:
    other = SRReference("1.2.840.10008.5.1.4.1.1.88.34", "1.2.3.4", "1.2.3", "1.2.9")
    with pytest.raises(ValueError, match="another study"):
        _build([synthetic_source()], [PROBS], predecessor=other)


def test_uids_are_reproducible_with_a_seed_and_random_without() -> None:
    source = synthetic_source()
    _, a = _build([source], [PROBS], uid_seed="result:7")
    _, b = _build([source], [PROBS], uid_seed="result:7")
    _, c = _build([source], [PROBS])
    uids = lambda r: [ds.SOPInstanceUID for _, ds in r.all()]  # noqa: E731
    assert uids(a) == uids(b)
    assert not set(uids(a)) & set(uids(c))
    assert len(set(uids(a))) == len(uids(a))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"priority": "URGENT"}, "priority must be one of"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        _build([synthetic_source()], [PROBS], **kwargs)


def test_sources_from_two_studies_are_refused() -> None:
    sources = [synthetic_source(), synthetic_source()]
    with pytest.raises(ValueError, match="2 studies"):
        _build(sources, [PROBS, PROBS])


def test_a_label_without_probability_is_refused() -> None:
    source = synthetic_source()
    prediction = prediction_for([source], [PROBS])
    del prediction.probabilities["Nodule"]
    with pytest.raises(ValueError, match="Nodule"):
        build_results([source], prediction, "ROUTINE", display_for([source]))


def test_no_heat_map_without_display_image() -> None:
    source = synthetic_source()
    prediction = prediction_for([source], [PROBS])
    with pytest.raises(ValueError, match="no display image"):
        build_results([source], prediction, "ROUTINE", {})


def test_present_absent_codes_are_snomed() -> None:
    _, results = _build([synthetic_source()], [PROBS])
    values = {
        item.ConceptNameCodeSequence[0].CodeMeaning: item.ConceptCodeSequence[0]
        for group in _groups(results.sr)
        for item in group.ContentSequence
        if item.ValueType == "CODE"
        and item.ConceptNameCodeSequence[0].CodeValue in {s.code.value for s in LABELS}
    }
    assert values["Pneumothorax"].CodeValue == PRESENT.value
    assert values["Pneumothorax"].CodingSchemeDesignator == "SCT"
    assert values["Nodule"].CodeValue == "272519000"


def test_building_logs_no_patient_name_or_id(caplog) -> None:
    # highdicom warns about names without a caret and quotes them: we must not let it.
    source = synthetic_source(name="Covid0000")
    source.PatientID = "PID-SECRET-77"
    with caplog.at_level(logging.DEBUG):
        _build([source], [PROBS])
    assert "Covid0000" not in caplog.text
    assert "PID-SECRET-77" not in caplog.text


def test_long_snomed_codes_and_meanings_survive() -> None:
    # SNOMED CT identifiers reach 18 digits (Long Code Value, PS3.3 8.8); meanings may
    # exceed LO's 64 characters in a manifest.
    long_code = Code("900000000000207008", "SCT", "A finding with a rather long name " * 3)
    labels = [LabelSpec("Long", long_code, 0.5)]
    source = synthetic_source()
    prediction = prediction_for([source], [{"Long": 0.7}], labels=labels)
    results = build_results([source], prediction, "HIGH", display_for([source]))
    finding = read_sr(results.sr).findings["Long"]
    assert (finding.code.value, finding.code.scheme) == (long_code.value, "SCT")
    assert finding.present and len(finding.code.meaning) == 64
