from __future__ import annotations

import open_clip

from anystory.tokenizer import build_clip_tokenizer


def test_offline_tokenizer_matches_openai_clip_ids(tokenizer_dir):
    tokenizer = build_clip_tokenizer(tokenizer_dir)
    for text in ("a photo of a cat", "Two wooden TOYS, on a red rug!", "naïve café"):
        ours = tokenizer(text)["input_ids"]
        reference = open_clip.tokenize([text])[0].tolist()
        assert ours == reference[: len(ours)] and all(t == 0 for t in reference[len(ours):])
    padded = build_clip_tokenizer(tokenizer_dir, pad_token="!")(["x"], padding="max_length")["input_ids"][0]
    assert len(padded) == 77 and padded[-1] == 0  # "!" is id 0, SDXL's second tokenizer's pad
