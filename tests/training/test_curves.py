from __future__ import annotations

import csv

import pytest

from training.curves import main


def _read(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_each_kind_of_row_gets_its_own_table_without_empty_points(tmp_path):
    # As Lightning's CSV logger writes it: lr rows, training rows and validation rows in one table.
    wide = tmp_path / "metrics.csv"
    wide.write_text("epoch,lr-AdamW,step,train/loss,train/loss_routing,val/loss,val/router_miou\n"
                    ",0.002,9,,,,\n"
                    "0,,9,0.5,0.1,,\n"
                    "0,,19,0.4,,,\n"
                    "0,,19,,,0.3,0.25\n")
    assert main([f"stage2={wide}", "--out", str(tmp_path / "curves")]) == 0
    assert _read(tmp_path / "curves" / "stage2_train.csv") == [
        {"step": "9", "train/loss": "0.5", "train/loss_routing": "0.1"},
        {"step": "19", "train/loss": "0.4", "train/loss_routing": ""}]
    assert _read(tmp_path / "curves" / "stage2_val.csv") == [{"step": "19", "val/loss": "0.3", "val/router_miou": "0.25"}]


def test_bad_arguments_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: runs: expected NAME=PATH, got 'metrics.csv'$"):
        main(["metrics.csv", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"^error: .*nothing\.csv: no such metrics file$"):
        main([f"stage1={tmp_path / 'nothing.csv'}", "--out", str(tmp_path / "curves")])
    assert not (tmp_path / "curves").exists()
