"""ActivityNet detection mAP: hand-computed cases and the documented edge cases."""
import _tal_path  # noqa: F401  (examples/tal on sys.path)
import json

import numpy as np
import pytest

import evaluate as evaluate_cli
from metrics import average_precision, evaluate, interpolated_ap, parse_tious, segment_tiou


def gt_db(entries, subset="validation"):
    """entries: {video: [(start, end, label), ...]}"""
    return {"database": {
        vid: {"subset": subset, "duration": 100.0,
              "annotations": [{"segment": [a, b], "label": l} for a, b, l in anns]}
        for vid, anns in entries.items()
    }}


def results(entries):
    """entries: [(video, label, score, start, end), ...]"""
    out = {}
    for vid, label, score, a, b in entries:
        out.setdefault(vid, []).append({"label": label, "score": score, "segment": [a, b]})
    return {"results": out}


# Class A: 3 ground truths; predictions in score order:
#   0.9 v1 [0,10]  -> TP (tIoU 1)
#   0.8 v1 [0,10]  -> duplicate of a matched one: FP
#   0.7 v2 [5,10]  -> tIoU 0.5 with [5,15]: TP at 0.5, FP at 0.7
#   0.6 v1 [21,30] -> tIoU 0.9 with [20,30]: TP
# At 0.5: precision 1, 1/2, 2/3, 3/4; recall 1/3, 1/3, 2/3, 1
#   envelope -> AP = 1/3 * 1 + 1/3 * 3/4 + 1/3 * 3/4 = 5/6
# At 0.7: precision 1, 1/2, 1/3, 1/2; recall 1/3, 1/3, 1/3, 2/3 -> AP = 1/3 * 1 + 1/3 * 1/2 = 1/2
GT_A = {"v1": [(0, 10, "A"), (20, 30, "A")], "v2": [(5, 15, "A")]}
PRED_A = [("v1", "A", 0.9, 0, 10), ("v1", "A", 0.8, 0, 10), ("v2", "A", 0.7, 5, 10), ("v1", "A", 0.6, 21, 30)]


def test_hand_computed_ap():
    res = evaluate(gt_db(GT_A), results(PRED_A), "validation", [0.5, 0.7])
    assert res["ap"]["A"] == pytest.approx([5 / 6, 1 / 2])
    assert res["mAP"] == pytest.approx([5 / 6, 1 / 2])
    assert res["average_mAP"] == pytest.approx((5 / 6 + 1 / 2) / 2)


def test_map_averages_classes_with_ground_truth_only():
    gt = {**GT_A, "v3": [(40, 50, "B")]}
    preds = PRED_A + [("v1", "C", 0.99, 0, 10)]     # C has no ground truth: not evaluated
    res = evaluate(gt_db(gt), results(preds), "validation", [0.5, 0.7])
    assert set(res["ap"]) == {"A", "B"}
    assert res["ap"]["B"] == [0.0, 0.0]              # a class nobody predicted
    assert res["mAP"] == pytest.approx([5 / 12, 1 / 4])
    assert res["ignored_predictions"] == 1


def test_video_without_predictions_lowers_recall():
    # only v1's two ground truths are found; v2 gets no prediction
    preds = [("v1", "A", 0.9, 0, 10), ("v1", "A", 0.8, 20, 30)]
    res = evaluate(gt_db(GT_A), results(preds), "validation", [0.5])
    assert res["ap"]["A"] == pytest.approx([2 / 3])


def test_prediction_outside_subset_or_wrong_video_is_false_positive():
    gt = gt_db(GT_A)
    gt["database"]["train1"] = {"subset": "training", "duration": 50.0,
                                "annotations": [{"segment": [0, 10], "label": "A"}]}
    preds = [("train1", "A", 0.95, 0, 10), ("v3", "A", 0.94, 0, 10)] + PRED_A
    # two false positives ahead of everything: precision 0, 0, 1/3, 1/4, 2/5, 1/2 ...
    res = evaluate(gt, results(preds), "validation", [0.5])
    # recall steps at ranks 3, 5, 6 with envelope precisions 1/2, 1/2, 1/2
    assert res["ap"]["A"] == pytest.approx([0.5])
    assert res["videos"] == 2


def test_zero_length_segments():
    # a zero-length prediction never matches; a zero-length ground truth can never be found
    gt = {"v1": [(0, 10, "A"), (7, 7, "A")]}
    preds = [("v1", "A", 0.9, 5, 5), ("v1", "A", 0.8, 0, 10), ("v1", "A", 0.7, 6, 8)]
    res = evaluate(gt_db(gt), results(preds), "validation", [0.1, 0.5])
    # ranks: FP, TP, FP; recall 0, 1/2, 1/2 -> AP = 1/2 * 1/2
    assert res["ap"]["A"] == pytest.approx([0.25, 0.25])
    assert segment_tiou(np.array([3.0, 3.0]), np.array([[3.0, 3.0]]))[0] == 0.0


def test_duplicates_match_other_ground_truth_of_the_video():
    gt = {"v1": [(0, 10, "A"), (1, 11, "A")]}
    preds = [("v1", "A", 0.9, 0, 10), ("v1", "A", 0.9, 0, 10), ("v1", "A", 0.9, 0, 10)]
    res = evaluate(gt_db(gt), results(preds), "validation", [0.5])
    # first -> [0,10], second -> [1,11] (tIoU 9/11), third -> FP; recall reaches 1 at precision 1
    assert res["ap"]["A"] == pytest.approx([1.0])


def test_each_prediction_takes_its_best_free_ground_truth():
    gt = {"v1": [(0, 10, "A"), (4, 14, "A")]}
    # [3,13] overlaps [4,14] best (tIoU 0.82) and [0,10] (0.54): it takes [4,14]
    preds = [("v1", "A", 0.9, 3, 13), ("v1", "A", 0.8, 0, 9)]
    res = evaluate(gt_db(gt), results(preds), "validation", [0.5, 0.85])
    # at 0.5 both match; at 0.85 the first is FP ([4,14] is 10/11=0.82 < 0.85) and [0,9] vs [0,10] = 0.9 matches
    assert res["ap"]["A"] == pytest.approx([1.0, 0.25])


def test_ties_keep_file_order():
    gt = {"v1": [(0, 10, "A")]}
    preds = [("v1", "A", 0.5, 50, 60), ("v1", "A", 0.5, 0, 10)]
    # stable sort: the FP comes first -> precision 1/2 at recall 1
    assert evaluate(gt_db(gt), results(preds), "validation", [0.5])["ap"]["A"] == pytest.approx([0.5])


def test_interpolated_ap_envelope():
    assert interpolated_ap(np.array([1.0, 0.5, 2 / 3, 0.75]), np.array([1 / 3, 1 / 3, 2 / 3, 1.0])) == pytest.approx(5 / 6)
    assert interpolated_ap(np.array([0.0]), np.array([0.0])) == 0.0
    assert average_precision({"v": np.array([[0.0, 1.0]])}, [], np.array([0.5])).tolist() == [0.0]


def test_parse_tious():
    assert parse_tious("0.3:0.7:5") == pytest.approx([0.3, 0.4, 0.5, 0.6, 0.7])
    assert len(parse_tious("0.5:0.95:10")) == 10
    for bad in ("0.5:0.95", "a:b:c", "0.5:1.5:3", "0.5:0.9:0"):
        with pytest.raises(ValueError, match="tIoU thresholds"):
            parse_tious(bad)


def test_cli_json(tmp_path, capsys):
    (tmp_path / "gt.json").write_text(json.dumps(gt_db(GT_A)))
    (tmp_path / "pred.json").write_text(json.dumps(results(PRED_A)))
    rc = evaluate_cli.main(["--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "pred.json"),
                            "--tious", "0.5:0.7:2", "--json"])
    assert rc == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    out = json.loads(line)
    assert set(out) == {"tious", "mAP", "average_mAP"}
    assert out["tious"] == pytest.approx([0.5, 0.7])
    assert out["average_mAP"] == pytest.approx(2 / 3)


def test_cli_table_and_errors(tmp_path, capsys):
    (tmp_path / "gt.json").write_text(json.dumps(gt_db(GT_A)))
    (tmp_path / "pred.json").write_text(json.dumps(results(PRED_A)))
    assert evaluate_cli.main(["--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "pred.json")]) == 0
    assert "average" in capsys.readouterr().out
    rc = evaluate_cli.main(["--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "pred.json"),
                            "--subset", "test"])
    assert rc == 2 and "subset 'test'" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    rc = evaluate_cli.main(["--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "bad.json")])
    assert rc == 2 and "not valid JSON" in capsys.readouterr().err
    rc = evaluate_cli.main(["--gt", str(tmp_path / "missing.json"), "--pred", str(tmp_path / "pred.json")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
