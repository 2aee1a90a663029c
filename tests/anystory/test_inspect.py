from __future__ import annotations

import json

from anystory.cli import main
from anystory.inspect_model import inspect_preset
from anystory.presets import get_preset


def test_sdxl_counts_match_the_papers_table_1():
    report = inspect_preset(get_preset("sdxl"))
    counts = report["parameters"]
    assert report["cross_attention_layers"] == 70
    assert report["referencenet_tapped_layers"] == 69  # G_2 .. G_70
    assert abs(counts["unet"] - 2.567e9) / 2.567e9 < 0.01
    assert abs(counts["referencenet"] - 2.02e9) / 2.02e9 < 0.01
    # Everything AnyStory adds is accounted for in the stage sets.
    assert report["stage2_trainable"] == counts["routing_qformer"] + counts["routers"]
    assert report["stage1_trainable"] == (
        counts["subject_qformer"] + counts["referencenet_trainable"]
        + counts["new_kv_cross_attention"] + counts["new_kv_self_attention"]
    )


def test_cli_inspect_prints_json(capsys):
    assert main(["inspect", "--preset", "tiny"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["preset"] == "tiny"
    assert report["cross_attention_layers"] == 11
    assert report["parameters"]["referencenet"] < report["parameters"]["unet"]
