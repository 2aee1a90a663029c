"""Tiny random-weight GroundingDINO and SAM written to files, so tests and smoke runs of the `auto`
annotation stage go through the real loading and inference code without any download.

GroundingDINO keeps the Swin-T backbone of its shipped config (the backbone is chosen by name; there is no
smaller Swin) and `hidden_dim = 256` (its text position embedding is hard-wired to 256); layers, queries,
sampling points and the BERT text encoder are cut down. SAM is a `Sam` built from explicit small sizes.
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import torch

from pipelines.auto_annotator import build_groundingdino, build_tiny_sam
from pipelines.config import AutoAnnotateConfig, TinySamSizes

_GDINO_OVERRIDES = {
    "enc_layers": 1,
    "dec_layers": 1,
    "dim_feedforward": 256,
    "num_queries": 30,
    "enc_n_points": 2,
    "dec_n_points": 2,
    "use_checkpoint": False,
    "use_transformer_ckpt": False,
}
_BERT_SIZES = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 256,
}
# Whole-word tokens for a few toy words; every other lower-case ASCII word splits into letter pieces.
_WORDS = "a the and on in of red blue green yellow small big dog cat ball box car cup tree chair person".split()


def _vocab() -> list[str]:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?", "!", "'", "-"]
    return list(dict.fromkeys(specials + letters + [f"##{c}" for c in letters] + _WORDS))


def _write_gdino_config(path: Path, text_encoder: Path) -> None:
    import groundingdino

    shipped = Path(groundingdino.__file__).parent / "config" / "GroundingDINO_SwinT_OGC.py"
    settings = {k: v for k, v in runpy.run_path(str(shipped)).items() if not k.startswith("__")}
    settings.update(_GDINO_OVERRIDES, text_encoder_type=str(text_encoder))
    lines = [f"# cut-down {shipped.name} with random weights, written by pipelines/tiny_detectors.py"]
    lines += [f"{key} = {value!r}" for key, value in settings.items()]
    path.write_text("\n".join(lines) + "\n")


def write_text_encoder(text_dir: Path, sizes: dict[str, int] | None = None) -> None:
    """A BERT text encoder for GroundingDINO in `text_dir`: the small word-piece vocabulary above, a fast
    tokenizer, and random weights of `sizes` (BertConfig fields; None: bert-base-uncased's sizes, the
    real encoder's cost, with the embedding table of its 30522-token vocabulary). Seed the RNG first."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    text_dir.mkdir(parents=True, exist_ok=True)
    (text_dir / "vocab.txt").write_text("\n".join(_vocab()) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(text_dir / "vocab.txt"), do_lower_case=True, model_max_length=256)
    tokenizer.save_pretrained(text_dir)
    config = BertConfig(vocab_size=len(_vocab()), **sizes) if sizes is not None else BertConfig()
    BertModel(config, add_pooling_layer=True).save_pretrained(text_dir)


def write_tiny_detectors(out_dir: Path, seed: int = 0) -> AutoAnnotateConfig:
    """Write tiny GroundingDINO (config, weights, BERT dir) and tiny SAM weights; return a config for them.

    Same seed, same bytes of weights. The global torch RNG is left as it was.
    """
    out_dir = Path(out_dir)
    text_dir = out_dir / "gdino_text_encoder"
    config = AutoAnnotateConfig(
        gdino_config=str(out_dir / "gdino_tiny.py"),
        gdino_checkpoint=str(out_dir / "gdino_tiny.pth"),
        gdino_text_encoder=str(text_dir),
        sam_model_type="tiny",
        sam_checkpoint=str(out_dir / "sam_tiny.pth"),
        gdino_image_size=256,
        gdino_max_image_size=448,
        tiny_sam=TinySamSizes(),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        write_text_encoder(text_dir, _BERT_SIZES)
        _write_gdino_config(Path(config.gdino_config), text_dir)
        gdino = build_groundingdino(config)
        torch.save({"model": gdino.state_dict()}, config.gdino_checkpoint)
        torch.save(build_tiny_sam(config.tiny_sam).state_dict(), config.sam_checkpoint)
    (out_dir / "auto_annotate.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return config
