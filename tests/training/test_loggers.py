"""The CSV logger of the stage configs, driven as the Trainer drives it (log_metrics, save)."""

from __future__ import annotations

import csv

from training.loggers import AppendingCSVLogger


def _rows(path):
    with open(path, newline="") as handle:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]


def _log(logger, steps, key="train/loss"):
    for step in steps:
        logger.log_metrics({key: float(step) / 10}, step=step)


def test_a_new_run_keeps_the_rows_before_its_first_step_and_replaces_the_rest(tmp_path):
    first = AppendingCSVLogger(str(tmp_path), name="csv", version="")
    _log(first, range(6))
    path = tmp_path / "csv" / "metrics.csv"
    before = path.read_bytes()

    # A start that logs nothing (it failed on its checkpoint, say) leaves the file as it was.
    _ = AppendingCSVLogger(str(tmp_path), name="csv", version="").experiment  # what Trainer setup does
    assert path.read_bytes() == before

    resumed = AppendingCSVLogger(str(tmp_path), name="csv", version="")
    _log(resumed, range(4, 7))  # resumed at step 4: the first run's rows 4 and 5 are logged again
    _log(resumed, [7], key="val/loss")  # a new column: the file is rewritten with it, rows kept
    assert _rows(path) == ([{"step": str(s), "train/loss": str(s / 10)} for s in range(7)]
                           + [{"step": "7", "val/loss": "0.7"}])
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.csv"]  # no temporary file left

    fresh = AppendingCSVLogger(str(tmp_path), name="csv", version="")
    _log(fresh, range(2))  # a run from step 0 replaces the curve
    assert _rows(path) == [{"step": str(s), "train/loss": str(s / 10)} for s in range(2)]
