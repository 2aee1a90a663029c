"""The runner's three kinds of step: the shard's source opens the first group, stages follow, its
sink closes the last group; no step is special because of its name."""

from __future__ import annotations

import pytest

from pipelines.config import parse_data_config
from pipelines.runner import Group, ReadShard, make_groups
from pipelines.shards.writer import WriteShard
from tests.pipelines.helpers import toy_params


@pytest.mark.parametrize("kind", ["unpaired", "paired"])
@pytest.mark.parametrize("mode", ["given", "auto"])
def test_the_source_opens_and_the_sink_closes_the_groups(tmp_path, kind, mode):
    data = toy_params(tmp_path / "toy", tmp_path / "out")["data"]
    data["annotate"]["mode"] = mode
    if mode == "auto":  # grouping builds no model: empty files stand where its weights go
        (tmp_path / "bert").mkdir()
        for name in ("g.py", "g.pth", "s.pth"):
            (tmp_path / name).touch()
        data["annotate"]["auto"]["model"] = {
            "gdino_config": str(tmp_path / "g.py"), "gdino_checkpoint": str(tmp_path / "g.pth"),
            "gdino_text_encoder": str(tmp_path / "bert"), "sam_model_type": "vit_b", "sam_checkpoint": str(tmp_path / "s.pth")}
    groups = make_groups(parse_data_config(data), kind, str(tmp_path / "out" / kind))
    assert [g.name for g in groups] == (["build"] if mode == "given" else ["prepare", "annotate_auto", "finish"])
    assert isinstance(groups[0].source, ReadShard) and all(g.source is None for g in groups[1:])
    assert isinstance(groups[-1].sink, WriteShard) and all(g.sink is None for g in groups[:-1])
    assert groups[-1].sink.out_url == str(tmp_path / "out" / kind)
    stages = [s for g in groups for s in g.stages]
    assert "read" not in stages and "write" not in stages
    assert stages[0] == "decode" and stages[-1] == "encode"


def test_a_group_reads_runs_its_stages_then_writes(tmp_path):
    cfg = parse_data_config(toy_params(tmp_path / "toy", tmp_path / "out")["data"])
    seen = {}

    def sink(spec, rows, timings):
        seen.update(spec=spec, rows=rows, timed=sorted(timings))
        return {"inputs": len(rows["x"])}

    group = Group("g", cfg, "unpaired", ["near_dupes"], source=lambda spec: {"x": [1, 2], "source_id": ["a", "b"]},
                  sink=sink)
    out = group({"spec": {"shard": 3, "near_duplicates": ["b"]}})
    # near_dupes rejected the row its spec listed; the sink saw the rows and the timings before its own.
    assert seen["rows"] == {"x": [1, 2], "source_id": ["a", "b"], "reject": [None, "near_duplicate"]}
    assert seen["spec"] == {"shard": 3, "near_duplicates": ["b"]} and seen["timed"] == ["near_dupes", "read"]
    assert out["stats"] == {"inputs": 2} and out["rows"] is None
    assert sorted(out["timings"]) == ["near_dupes", "read", "write"]
