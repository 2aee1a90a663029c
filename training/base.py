"""Toy-only `base` stage: the tiny preset has no pretrained SDXL, so the toy chain first fits the
tiny VAE, then the tiny UNet (text-conditioned, epsilon prediction) on the toy shards; stages 1-2
then keep the paper's frozen-base setting on top of it. Real runs start from SDXL weights instead.

With `--catalogue` (the toy world's manifest) the base learns from captions that name each subject's
colour, texture and shape, as SDXL knows colour and texture words; the AnyStory stages then train on
the shards' own captions, which name only the shape (`data.toyworld.caption: label`), so that only
the reference can say what a subject looks like, and the subject tokens, which live in the text
space, have words of the base to aim at (paper.md, note on Fig. 3).

`python -m training.base --shards data/shards/unpaired --out runs/toy_base ...` writes the base in
the diffusers layout (the folder that `base_dir` of the stage configs points at)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from anystory.components import SDXL_SCHEDULER, BaseComponents, build_random, save_components
from anystory.presets import get_preset
from pipelines.toyworld.render import caption
from training.data.datamodule import ShardDataModule
from training.data.sample import SampleConfig, preset_sizes
from training.diffusion import diffusion_step
from training.identity import IdentityError, load_catalogue, shard_identities
from training.text import TextEncoder


class ToyVAE(L.LightningModule):
    """Reconstruction + a small KL term."""

    def __init__(self, components: BaseComponents, lr: float, kl_weight: float = 1e-6) -> None:
        super().__init__()
        self.vae = components.vae
        self.lr, self.kl_weight = lr, kl_weight

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        posterior = self.vae.encode(batch["pixels"]).latent_dist
        recon = self.vae.decode(posterior.sample()).sample
        rec = F.mse_loss(recon, batch["pixels"])
        loss = rec + self.kl_weight * posterior.kl().mean()
        self.log_dict({"base/vae_reconstruction": rec, "base/vae_loss": loss}, prog_bar=True,
                      batch_size=batch["pixels"].shape[0])
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.vae.parameters(), lr=self.lr)


class ToyUNet(L.LightningModule):
    """Epsilon-prediction diffusion loss on the frozen VAE's latents, SDXL-style conditioning."""

    def __init__(self, components: BaseComponents, lr: float, captions: dict[str, str] | None = None) -> None:
        super().__init__()
        self.captions = captions or {}  # sample key -> the caption to train on instead of the shard's
        self.unet = components.unet
        self.vae = components.vae.requires_grad_(False)
        self.text_encoder = components.text_encoder.requires_grad_(False)
        self.text_encoder_2 = components.text_encoder_2.requires_grad_(False)
        self.encode_text = TextEncoder(components)
        self.scheduler = DDPMScheduler(**SDXL_SCHEDULER)
        self.lr = lr

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        with torch.no_grad():
            latents = self.vae.encode(batch["pixels"]).latent_dist.sample() * self.vae.config.scaling_factor
            captions = [self.captions.get(key, c) for key, c in zip(batch["key"], batch["caption"], strict=True)]
            embeds, pooled = self.encode_text(captions, self.device)
        added = {"text_embeds": pooled, "time_ids": batch["time_ids"]}
        loss, _ = diffusion_step(self.scheduler, latents,
                                 lambda noisy, t: (self.unet(noisy, t, embeds, added_cond_kwargs=added).sample, None))
        self.log("base/unet_loss", loss, prog_bar=True, batch_size=latents.shape[0])
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.unet.parameters(), lr=self.lr)


def phrase_captions(shards: list[str], catalogue: Path) -> dict[str, str]:
    """Sample key -> the toy world's "phrase" caption of its subjects (colour, texture, shape), from
    the identity ids the shard json records; samples with an unknown identity keep their caption."""
    identities = {ident.id: ident for ident in load_catalogue(catalogue)}
    out = {}
    for key, ids in shard_identities(shards).items():
        if all(i in identities for i in ids):
            out[key] = caption([identities[i] for i in ids], "phrase")
    return out


def fit_toy_base(shards: list[str], out: Path, vae_steps: int, unet_steps: int, batch_size: int = 8,
                 lr: float = 5e-4, seed: int = 0, num_workers: int = 2, tokenizer_dir: str = ".cache/anystory-tokenizer",
                 root_dir: str = "runs/toy_base", catalogue: Path | None = None) -> Path:
    config = get_preset("tiny")
    captions = phrase_captions(shards, catalogue) if catalogue is not None else None
    L.seed_everything(seed)
    components = build_random(config, tokenizer_dir, seed=seed)
    sample = SampleConfig(**preset_sizes(config), max_subjects=1, clip_drop=0.0, augment=None)
    phases = (("vae", lambda: ToyVAE(components, lr), vae_steps), ("unet", lambda: ToyUNet(components, lr, captions), unet_steps))
    for phase, make_module, steps in phases:
        if steps <= 0:
            continue
        module = make_module()  # built when its phase starts: the UNet phase freezes the VAE
        data = ShardDataModule(train_shards=shards, batch_size=batch_size, num_workers=num_workers,
                               batches_per_epoch=max(1, min(steps, 100)), seed=seed, sample=sample)
        logger = L.pytorch.loggers.WandbLogger(project="anystory", name=f"toy_base_{phase}", offline=True,
                                               save_dir=root_dir)
        trainer = L.Trainer(max_steps=steps, accelerator="auto", devices=1, logger=logger, enable_checkpointing=False,
                            default_root_dir=root_dir, log_every_n_steps=10, num_sanity_val_steps=0)
        trainer.fit(module, datamodule=data)
        logger.experiment.finish()
    components.unet.eval()
    components.vae.eval()
    save_components(components, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", nargs="+", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--vae-steps", type=int, default=300)
    parser.add_argument("--unet-steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--root-dir", default="runs/toy_base")
    parser.add_argument("--catalogue", type=Path, default=None,
                        help="toy-world manifest.json: train the UNet on captions naming colour, texture and shape")
    args = parser.parse_args(argv)
    if args.catalogue is not None:
        try:
            load_catalogue(args.catalogue)  # a bad path or file: one line before any work
        except IdentityError as err:
            parser.exit(2, f"error: --catalogue: {err}\n")
    fit_toy_base(args.shards, args.out, args.vae_steps, args.unet_steps, args.batch_size, args.lr, args.seed,
                 args.num_workers, root_dir=args.root_dir, catalogue=args.catalogue)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
