"""The toy base's captions: with the toy world's catalogue they name each subject's colour, texture and
shape (what a pretrained SDXL knows words for), read from the identity ids of the shard json."""

from __future__ import annotations

import json

import pytest

from training.base import main, phrase_captions


def test_phrase_captions_name_each_subjects_colour_texture_and_shape(shard_dirs, toy_manifest):
    captions = phrase_captions([str(shard_dirs["val"])], toy_manifest)
    # tests/training/shards.py: sample i holds 1 + i % 3 squares with identities 0, 1, 2 (red, green, blue)
    assert captions == {
        "test-000000-000000": "a photo of a red plain square",
        "test-000000-000001": "a photo of a red plain square and a green plain square",
        "test-000000-000002": "a photo of a red plain square, a green plain square and a blue plain square",
        "test-000000-000003": "a photo of a red plain square",
    }


def test_a_bad_catalogue_is_one_line_before_any_work(shard_dirs, tmp_path, capsys):
    bad = tmp_path / "manifest.json"
    bad.write_text(json.dumps({"no": "identities"}))
    with pytest.raises(SystemExit) as exit_:
        main(["--shards", str(shard_dirs["val"]), "--out", str(tmp_path / "out"), "--catalogue", str(bad)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err and not (tmp_path / "out").exists()
