"""Score predictions with the ActivityNet detection protocol (see metrics.py for the exact rules).

    python examples/tal/evaluate.py --gt GT.json --pred PRED.json [--subset validation]
                                    [--tious START:STOP:NUM] [--json]

Thresholds are numpy.linspace(START, STOP, NUM): 0.5:0.95:10 for ActivityNet (the default),
0.3:0.7:5 for THUMOS-14. `--subset all` evaluates every video of the ground truth.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from data import AnnotationError, read_json
from metrics import evaluate, parse_tious


def format_table(res: dict) -> str:
    lines = ["tIoU   " + " ".join(f"{t:6.2f}" for t in res["tious"]) + "   average",
             "mAP    " + " ".join(f"{100 * m:6.2f}" for m in res["mAP"]) + f"   {100 * res['average_mAP']:7.2f}"]
    lines.append(f"({len(res['ap'])} classes with ground truth, {res['videos']} videos)")
    if res["ignored_predictions"]:
        lines.append(f"note: {res['ignored_predictions']} predictions with labels absent from the ground truth were ignored")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gt", required=True, help="ground truth, ActivityNet-style JSON with a 'database'")
    p.add_argument("--pred", required=True, help='predictions, {"results": {video: [{label, score, segment}]}}')
    p.add_argument("--subset", default="validation", help="subset of the ground truth to evaluate, or 'all'")
    p.add_argument("--tious", default="0.5:0.95:10", help="START:STOP:NUM as numpy.linspace")
    p.add_argument("--json", action="store_true", help='print one line {"tious", "mAP", "average_mAP"}')
    p.add_argument("--per-class", action="store_true", help="also print AP per class")
    args = p.parse_args(argv)
    try:
        tious = parse_tious(args.tious)
        gt = read_json(args.gt, "ground-truth file")
        pred = read_json(args.pred, "predictions file")
        res = evaluate(gt, pred, None if args.subset == "all" else args.subset, tious)
    except (ValueError, FileNotFoundError, AnnotationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"tious": res["tious"], "mAP": res["mAP"], "average_mAP": res["average_mAP"]}))
    else:
        print(format_table(res))
        if args.per_class:
            for label, ap in res["ap"].items():
                print(f"  {label:30s} " + " ".join(f"{100 * a:6.2f}" for a in ap))
    return 0


if __name__ == "__main__":
    sys.exit(main())
