"""bench.eval_ct without models: how cases are drawn and perturbed, and how findings are scored."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench import eval_ct
from spine_node.inference.findings import (
    AssessmentValues,
    Finding,
    Findings,
    LabelMap,
    ModelInfo,
    Segment,
    SiteStatus,
)
from tests.peers import require_module

SEED = 9_200_000


def _toy_case(fractured: tuple[str, ...] = ("C2", "C5")) -> eval_ct.Case:
    """Seven vertebrae stacked along z, two slices each, on a 4 x 4 in-plane grid."""
    labels = np.zeros((14, 4, 4), np.uint8)
    for k in range(7):
        labels[2 * k:2 * k + 2] = k + 1
    return eval_ct.Case(seed=1, hu=np.zeros(labels.shape, np.float32), spacing=(2.0, 2.0, 2.0),
                        labels=labels, in_field={name: 1.0 for name in eval_ct.LEVELS},
                        fractured={name: name in fractured for name in eval_ct.LEVELS})


def _findings(frames: np.ndarray, uids: tuple[str, ...], probabilities: dict[str, float],
              patient: float | None, status: dict[str, AssessmentValues] | None = None,
              label_of: dict[str, int] | None = None) -> Findings:
    label_of = label_of or {name: i + 1 for i, name in enumerate(eval_ct.LEVELS)}
    present = sorted({int(v) for v in np.unique(frames)} - {0})
    name_of = {v: k for k, v in label_of.items()}
    findings = [Finding("fracture", p, site=site) for site, p in probabilities.items()]
    if patient is not None:
        findings.append(Finding("fracture", patient))
    return Findings(
        pipeline="ct-cspine-fracture", model=ModelInfo("m", "1"), study_uid="1.2",
        series_uids=("1.2.3",), source_sop_instance_uids=uids, findings=findings,
        segmentation=LabelMap(frames, uids, tuple(Segment(v, name_of[v]) for v in present)),
        site_status=tuple(SiteStatus(site, a) for site, a in (status or {}).items()),
    )


def test_scoring_right_shifted_and_refused_cases() -> None:
    case = _toy_case()
    uids = tuple(f"1.2.3.{k}" for k in range(14))
    truth_probs = {name: (0.9 if case.fractured[name] else 0.1) for name in eval_ct.LEVELS}

    # Right: the pipeline numbers C1..C7 as 11..17 and lists its frames in reverse order;
    # the harness maps them back by segment name and by SOP instance UID.
    label_of = {name: 11 + i for i, name in enumerate(eval_ct.LEVELS)}
    frames = np.where(case.labels > 0, case.labels + 10, 0).astype(np.uint8)[::-1]
    right = _findings(frames, uids[::-1], truth_probs, 0.9, label_of=label_of)
    predicted, others = eval_ct.predicted_labels(right, uids, case.labels.shape)
    assert others == 0 and np.array_equal(predicted, case.labels)
    record_right = eval_ct.score_case(case, right, predicted)

    # Shifted by one level: every vertebra carries the name of the one below; C7 unlabelled.
    shifted = np.where((case.labels >= 1) & (case.labels <= 6), case.labels + 1, 0).astype(np.uint8)
    wrong = _findings(shifted, uids, {name: 0.2 for name in eval_ct.LEVELS[1:]}, None)
    record_wrong = eval_ct.score_case(case, wrong, eval_ct.predicted_labels(wrong, uids, shifted.shape)[0])

    # The pipeline says C3 is not assessable: that vertebra counts as unlabelled, not wrong.
    explicit = _findings(case.labels.copy(), uids, truth_probs, 0.9,
                         status={"C3": AssessmentValues.NOT_ASSESSABLE,
                                 **{n: AssessmentValues.ASSESSED for n in eval_ct.LEVELS if n != "C3"}})
    record_explicit = eval_ct.score_case(case, explicit, case.labels.copy())

    record_refused = eval_ct.score_case(case, None, None, error="PipelineError: no")
    for record, kind in ((record_right, None), (record_wrong, None), (record_explicit, None),
                         (record_refused, "refused")):
        record.update(seconds=1.0, generate_seconds=0.1, path="analyse", error_kind=kind)
    record_refused["seconds"] = float("nan")

    summary = eval_ct.summarise("toy", [record_right, record_wrong, record_explicit, record_refused])
    la = summary["level_accuracy"]
    assert la["vertebrae"] == 28
    assert (la["right"]["k"], la["wrong"]["k"], la["unlabelled"]["k"]) == (7 + 6, 6, 1 + 1 + 7)
    assert la["right_or_unlabelled"]["share"] == pytest.approx(22 / 28, abs=1e-4)
    # Dice: 1 in the right and explicit cases (C3 included: its voxels are labelled), 0 in
    # the shifted and refused ones.
    assert summary["dice"]["C1"] == pytest.approx(0.5)
    assert summary["dice_mean"] == pytest.approx(0.5)
    assert summary["refused"] == 1 and summary["crashed"] == 0
    # Vertebra scores: the right case separates perfectly, the shifted case scores every
    # vertebra 0.2 except C1 (no finding: 0), the refused case scores all 0.
    pooled = summary["auc_vertebra"]
    assert (pooled["positives"], pooled["negatives"]) == (8, 20)
    assert pooled["method"] == "cluster bootstrap"
    # Patient level: every case has a fracture; the shifted case has no patient finding,
    # so its score is its highest level (0.2), below the 0.5 threshold.
    assert summary["sensitivity"]["k"] == 2 and summary["sensitivity"]["n"] == 4
    assert summary["specificity"]["n"] == 0 and summary["auc_patient"]["auc"] is None
    assert summary["seconds_mean"] == pytest.approx(1.0)


def test_patient_truth_follows_the_field() -> None:
    """A fracture in a vertebra mostly outside the field leaves the patient out; one in a
    vertebra wholly outside makes the patient fracture-free."""
    uids = tuple(f"1.2.3.{k}" for k in range(14))
    records = []
    for share, expected in ((0.3, "left out"), (0.0, "negative"), (1.0, "positive")):
        case = _toy_case(fractured=("C1",))
        case.in_field["C1"] = share
        if share == 0.0:
            case.labels[case.labels == 1] = 0
        findings = _findings(case.labels.copy(), uids, {"C2": 0.7}, None)
        record = eval_ct.score_case(case, findings, case.labels.copy())
        record.update(seconds=1.0, generate_seconds=0.1, path="analyse", error_kind=None)
        records.append(record)
        summary = eval_ct.summarise("one", [record])
        if expected == "left out":
            assert summary["patients_left_out"] == 1
        elif expected == "negative":
            assert summary["specificity"]["n"] == 1 and summary["specificity"]["k"] == 0
            assert summary["fracture_free_with_present"]["k"] == 1
        else:
            assert summary["sensitivity"] == {"k": 1, "n": 1, "share": 1.0, "ci95": [0.2065, 1.0]}
    negatives = eval_ct.summarise("neg", records, negative=True)
    assert negatives["not_assessable"]["k"] == 0 and negatives["segments_total"] == 7 + 6 + 7
    assert negatives["present_total"] == 3


def test_same_generator_perturbations() -> None:
    base = eval_ct.make_case(eval_ct.COHORTS["same"], SEED)
    assert base.hu.shape == (80, 64, 64) and base.spacing == (2.0, 2.0, 2.0)
    assert set(np.unique(base.labels)) == set(range(8))
    assert all(share == 1.0 for share in base.in_field.values())

    hot = eval_ct.make_case(eval_ct.COHORTS["same/hu+100"], SEED)
    assert np.array_equal(hot.labels, base.labels)
    # Stored as whole HU, so rounding may move a voxel by one.
    assert np.array_equal(hot.hu, np.rint(hot.hu))
    assert np.abs(hot.hu - np.clip(base.hu + 100.0, -1024.0, 3071.0)).max() <= 1.0
    cold = eval_ct.make_case(eval_ct.COHORTS["same/hu-100"], SEED)
    assert cold.hu.min() == -1024.0
    assert np.abs(cold.hu[base.hu > 0] - (base.hu[base.hu > 0] - 100.0)).max() <= 1.0

    thick = eval_ct.make_case(eval_ct.COHORTS["same/3mm"], SEED)
    assert thick.spacing == (3.0, 2.0, 2.0) and thick.hu.shape[0] == 53
    assert set(np.unique(thick.labels)) == set(range(8))
    assert all(share == 1.0 for share in thick.in_field.values())
    # A 3 mm profile smooths along z: less slice-to-slice change than the 2 mm grid has.
    assert np.abs(np.diff(thick.hu, axis=0)).mean() < np.abs(np.diff(base.hu, axis=0)).mean()

    cropped = eval_ct.make_case(eval_ct.COHORTS["same/no_skull_base"], SEED)
    assert 1 not in cropped.labels and cropped.in_field["C1"] == 0.0
    assert 0.0 < cropped.in_field["C2"] <= 1.0 and cropped.in_field["C7"] == 1.0
    assert cropped.hu.shape[0] < base.hu.shape[0]

    rotation = eval_ct.COHORTS["same/rot10"].perturbation.resolved_rotation(SEED)
    assert rotation is not None and sorted(abs(a) for a in rotation) == [0.0, 0.0, 10.0]

    negative = eval_ct.make_case(eval_ct.COHORTS["neg/thoracic"], SEED)
    assert not negative.labels.any() and negative.in_field == {}


def test_expand_cohorts() -> None:
    assert eval_ct.expand_cohorts("same,clinical_grid") == ["same", "same/clinical_grid",
                                                             "cross/clinical_grid"]
    negatives = eval_ct.expand_cohorts("negatives")
    assert "neg/head" in negatives and "neg/lumbar" in negatives and "same" not in negatives
    assert len(eval_ct.expand_cohorts("all")) == len(eval_ct.COHORTS)
    with pytest.raises(SystemExit, match="unknown cohort 'spine'"):
        eval_ct.expand_cohorts("same,spine")
    counts = eval_ct.cohort_counts(["same", "same/clinical_grid", "cross"], 200, "cross=30")
    assert counts == {"same": 200, "same/clinical_grid": eval_ct.BIG_GRID_CASES, "cross": 30}
    assert eval_ct.cohort_counts(["same/clinical_grid"], 8) == {"same/clinical_grid": 8}
    with pytest.raises(SystemExit, match="bad --n-per entry 'cross=0'"):
        eval_ct.cohort_counts(["cross"], 8, "cross=0")


def test_predicted_labels_rejects_frames_that_do_not_match() -> None:
    case = _toy_case()
    uids = tuple(f"1.2.3.{k}" for k in range(14))
    findings = _findings(case.labels[:10].copy(), uids[:10], {}, None)
    with pytest.raises(ValueError, match="4 of 14 slices without a frame"):
        eval_ct.predicted_labels(findings, uids, case.labels.shape)
    assert math.isnan(eval_ct.summarise("empty", [])["dice_mean"] or float("nan"))


def test_generator_failures_are_left_out_and_counted() -> None:
    case = _toy_case()
    uids = tuple(f"1.2.3.{k}" for k in range(14))
    findings = _findings(case.labels.copy(), uids, {"C2": 0.9, "C5": 0.8, "C3": 0.1}, 0.9)
    record = eval_ct.score_case(case, findings, case.labels.copy())
    record.update(seconds=1.0, generate_seconds=0.1, path="analyse", error_kind=None)
    failed = {"seed": 2, "error_kind": "generator", "error": "ValueError: broken"}
    summary = eval_ct.summarise("toy", [record, failed])
    assert summary["n"] == 1 and summary["generator_failed"] == 1
    assert summary["dice_mean"] == 1.0 and summary["level_accuracy"]["right"]["k"] == 7
    assert "+1 the generator failed on" in eval_ct._n(summary)


def test_both_pipeline_entries_give_one_answer() -> None:
    """analyse() on the volume and run() on the same volume written as a DICOM series (on
    a grid the DICOM checks accept) answer alike: the two entries measure one pipeline."""
    require_module("onnxruntime", "the onnxruntime package")
    from spine_node.inference.pipelines import ct_cspine

    if not hasattr(ct_cspine.CervicalSpineCtFracture, "analyse"):
        pytest.skip("this pipeline has no analyse()")
    models = eval_ct.model_provider()
    grid = eval_ct.Perturbation(spacing=(2.0, 1.0, 1.0))
    # keep_going: a pipeline that crashes must crash alike on both entries.
    a, d = (eval_ct.evaluate_case("same", SEED, models, grid, via=via, keep_going=True)
            for via in ("analyse", "dicom"))
    assert a["shape"] == d["shape"] == [80, 128, 128]
    assert (a["error_kind"], a["error"]) == (d["error_kind"], d["error"])
    if a["error_kind"] is None:
        assert (a["path"], d["path"]) == ("analyse", "run")
    for key in ("not_performed_reason", "assessed", "not_assessable", "segments", "present", "patient_present"):
        assert a[key] == d[key], key
    assert a["levels"].keys() == d["levels"].keys()
    for name, level in a["levels"].items():
        other = d["levels"][name]
        assert level["predicted_voxels"] == other["predicted_voxels"], name
        assert (level["score"] is None) == (other["score"] is None), name
        if level["score"] is not None:
            assert level["score"] == pytest.approx(other["score"], abs=1e-5), name


def test_stage_two_kinds_crops_each_vertebra_at_its_true_box() -> None:
    """bench.ct_kinds: one crop per vertebra in the field, its level, the forced kind."""
    from bench import ct_kinds

    crops, levels, kinds = ct_kinds.case_crops(ct_kinds.SEED_BASE)  # pattern 0: a dens fracture of C2
    assert crops.shape[1:] == (24, 48, 48) and len(crops) == len(levels) == len(kinds) >= 6
    assert kinds[levels.index("C2")] == "dens"
    assert [k for k, lv in zip(kinds, levels, strict=True) if lv != "C2"] == [""] * (len(levels) - 1)
    assert levels == sorted(levels)
    # every crop holds bone around its middle (normalised HU > 0.3 somewhere in the centre)
    assert (crops[:, 8:16, 16:32, 16:32].max(axis=(1, 2, 3)) > 0.3).all()


def test_stage_two_kinds_on_the_training_generator_name_the_drawn_pattern() -> None:
    """bench.ct_kinds --generator same: the training generator's default phantom with the
    pattern forced in turn; each fractured crop carries the kind the draw took."""
    from bench import ct_kinds

    seen = set()
    for offset in range(len(ct_kinds.SAME_PATTERNS)):
        pattern = ct_kinds.SAME_PATTERNS[offset]
        crops, levels, kinds = ct_kinds.same_case_crops(ct_kinds.SEED_BASE + offset)
        assert len(crops) == len(levels) == 7 and levels == sorted(levels)
        fractured = {lv: k for lv, k in zip(levels, kinds, strict=True) if k}
        if pattern is None:
            assert fractured == {}
            continue
        assert set(fractured) == {pattern[0]}
        seen.add(fractured[pattern[0]])
    assert {"dens II", "dens III"} & seen and "hangman" in seen and "wedge" in seen
    assert {"dens base", "crack"} & seen


def test_records_file_resumes_a_run_and_refuses_another(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """--records: finished cases are kept per line; the same command skips them and gives
    the same figures; a cut-off last line runs again; other weights are refused."""
    require_module("onnxruntime", "the onnxruntime package")
    monkeypatch.setattr(eval_ct, "source_commit", lambda: "commit test")
    records, out = tmp_path / "records.jsonl", tmp_path / "eval.json"
    argv = ["--n", "2", "--cohorts", "same,neg/air", "--records", str(records), "--json", str(out)]
    # --write without RESULTS.md or cards: keep the figures in the JSON file only.
    monkeypatch.setattr(eval_ct, "replace_section", lambda *a, **k: None)
    monkeypatch.setattr(eval_ct, "fold_into_cards", lambda *a, **k: [])
    assert eval_ct.main([*argv, "--write"]) == 0
    first = json.loads(out.read_text())["cohorts"]
    lines = records.read_text().splitlines()
    assert len(lines) == 1 + 4 and json.loads(lines[0])["config"]["commit"] == "commit test"
    # A kill while the last case was written: its line is cut; that case runs again.
    records.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    capsys.readouterr()
    assert eval_ct.main([*argv, "--write"]) == 0
    assert "3 of 4 cases read from" in capsys.readouterr().out
    again = json.loads(out.read_text())["cohorts"]
    for name in ("same", "neg/air"):
        a, b = dict(first[name]), dict(again[name])
        for result in (a, b):
            result.pop("seconds_per_case", None)
            result["records"] = [{k: v for k, v in r.items() if "seconds" not in k}
                                 for r in result["records"]]
        assert a.keys() == b.keys()
        for key in a:
            if "seconds" not in key:
                assert a[key] == b[key], (name, key)
    assert len(records.read_text().splitlines()) == 1 + 4
    # Another model repository: refused, the file left as it was.
    other = tmp_path / "engines"
    (other / "cspine-ct-fracture").mkdir(parents=True)
    (other / "cspine-ct-fracture" / "model.onnx").write_bytes(b"other weights")
    with pytest.raises(SystemExit, match="weights differ"):
        eval_ct.main([*argv, "--engines-dir", str(other)])
    assert len(records.read_text().splitlines()) == 1 + 4
