"""Which identity a subject's region carries in a model output, on the toy world (whose catalogue
knows every subject's shape, colour and texture).

The ground-truth layout fixes each subject's shape (its mask is the shape), so what the reference
must bring is the appearance: colour and texture. A region is described by the mean colour of its
pixels (its mask eroded by one pixel, so that edges blurred into the background do not count);
each appearance of the catalogue by the mean colour of that texture painted in that colour, drawn
by the toy world's own renderer. The region carries the appearance whose colour is nearest: its
own reference's (correct), another subject's of the same image (blended), or one that no subject
of the image has (neither)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds

from pipelines.shards.contract import JSON
from pipelines.toyworld.catalogue import Identity
from pipelines.toyworld.render import Placement, paint_subject
from training.data.datamodule import list_shards

OWN, BLENDED, NEITHER, ABSENT = 0, 1, 2, -1
MIN_PIXELS = 4  # an eroded region smaller than this falls back to the whole mask
ALIKE = 12.0  # appearances whose mean colours are closer than this (0..255 RGB) count as one


class IdentityError(ValueError):
    """A catalogue file that cannot be used; the message names it."""


def load_catalogue(path: Path) -> list[Identity]:
    """The identities a toy-world manifest (`python -m pipelines.toyworld` writes `manifest.json`) lists."""
    try:
        entries = json.loads(Path(path).read_text())["identities"]
        return [Identity(int(e["id"]), str(e["shape"]), str(e["texture"]), str(e["colour"])) for e in entries]
    except FileNotFoundError as err:
        raise IdentityError(f"{path}: no such toy-world manifest") from err
    except (ValueError, KeyError, TypeError) as err:
        raise IdentityError(f"{path}: not a toy-world manifest with an 'identities' list ({err})") from err


@dataclass(frozen=True)
class Appearances:
    """The catalogue's appearances as a mean colour can tell them apart: their names
    ("colour texture", joined by " | " where several look alike), mean colours (C, 3) in 0..255,
    and the appearance index of each identity id."""

    names: list[str]
    colours: np.ndarray
    of_identity: dict[int, int]

    @classmethod
    def of(cls, identities: list[Identity], size: int = 64) -> Appearances:
        """Each identity painted on a mid-grey canvas of `size` px (the model's resolution) at two
        sizes and angles, measured as a region is. Identities of one colour and texture (other
        shapes) are one appearance; appearances whose colours lie within ALIKE of each other (e.g.
        striped and checkered in one colour: half the colour, half its shade) are merged, since a
        mean colour cannot tell them apart. (Passing the drawings through the toy VAE first does not
        help: it shifts some colours so far that more appearances merge.)"""
        kinds = sorted({(i.colour, i.texture) for i in identities})
        drawings, masks, owners = [], [], []
        for ident in identities:
            for radius, angle in ((0.18, 0.0), (0.3, 0.6)):
                canvas = np.full((size, size, 3), 128, dtype=np.uint8)
                masks.append(paint_subject(canvas, Placement(ident, size / 2, size / 2, size * radius, angle)))
                drawings.append(canvas)
                owners.append(kinds.index((ident.colour, ident.texture)))
        images = torch.from_numpy(np.stack(drawings)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        mask_t = torch.from_numpy(np.stack(masks)).float()[:, None]
        colours, _ = region_colours(images, mask_t, torch.ones(len(masks), 1, dtype=torch.bool))
        sums = np.zeros((len(kinds), 3))
        counts = np.zeros(len(kinds))
        np.add.at(sums, owners, colours[:, 0].double().numpy())
        np.add.at(counts, owners, 1)
        means = sums / counts[:, None]
        # Merge look-alikes: each kind joins the group of the first earlier kind within ALIKE.
        group = list(range(len(kinds)))
        for k in range(len(kinds)):
            for j in range(k):
                if np.linalg.norm(means[k] - means[j]) < ALIKE:
                    group[k] = group[j]
                    break
        roots = sorted(set(group))
        members = [[k for k in range(len(kinds)) if group[k] == r] for r in roots]
        names = [" | ".join(f"{kinds[k][0]} {kinds[k][1]}" for k in ks) for ks in members]
        table = np.stack([means[ks].mean(0) for ks in members])
        index = {k: roots.index(group[k]) for k in range(len(kinds))}
        return cls(names, table, {i.id: index[kinds.index((i.colour, i.texture))] for i in identities})


def region_colours(images: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean colour (B, N, 3) in 0..255 of each subject's pixels in `images` (B, 3, H, W, in -1..1),
    inside its mask (B, N, H, W) eroded by one pixel (the whole mask if that leaves too little).
    Returns the colours and which subjects have any pixel (valid and a non-empty mask)."""
    if masks.shape[-2:] != images.shape[-2:]:
        masks = F.interpolate(masks.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
    inside = (masks > 0.5).float()
    eroded = -F.max_pool2d(-inside, kernel_size=3, stride=1, padding=1)
    use = torch.where((eroded.sum((-2, -1)) >= MIN_PIXELS)[..., None, None], eroded, inside)
    pixels = (images.float().clamp(-1, 1) + 1) * 127.5  # (B, 3, H, W)
    area = use.sum((-2, -1))  # (B, N)
    colours = torch.einsum("bnhw,bchw->bnc", use, pixels) / area.clamp(min=1)[..., None]
    return colours, valid.bool() & (area > 0)


def decide(colours: torch.Tensor, present: torch.Tensor, own: torch.Tensor, appearances: Appearances) -> torch.Tensor:
    """Per subject (B, N): OWN if the nearest appearance is its own (`own`, appearance indices,
    -1 where unknown), BLENDED if it is another present subject's of the same image, NEITHER
    otherwise; ABSENT for subjects without pixels or identity."""
    table = torch.as_tensor(appearances.colours, dtype=torch.float32)
    nearest = torch.cdist(colours.float().reshape(-1, 3), table).argmin(-1).reshape(own.shape)
    counts = present & (own >= 0)
    is_own = nearest == own
    # nearest equals the appearance of some other subject (j != i) of the same image
    others = (nearest[:, :, None] == own[:, None, :]) & counts[:, None, :]
    others &= ~torch.eye(own.shape[1], dtype=torch.bool, device=own.device)[None]
    outcome = torch.where(is_own, OWN, torch.where(others.any(-1), BLENDED, NEITHER))
    return torch.where(counts, outcome, torch.full_like(outcome, ABSENT))


def shard_identities(locations: list[str]) -> dict[str, list[int | None]]:
    """Sample key -> the identity id of each subject (None where the json names none), in the
    order the data module stacks them (the json's `subjects`, unshuffled for validation)."""
    out: dict[str, list[int | None]] = {}
    for sample in wds.DataPipeline(wds.SimpleShardList(list_shards(locations)), wds.tarfile_to_samples()):
        if JSON not in sample:
            continue
        meta = json.loads(sample[JSON])
        out[sample["__key__"]] = [s.get("identity") for s in meta.get("subjects") or []]
    return out


def own_appearances(keys: list[str], slots: int, by_key: dict[str, list[int | None]],
                    appearances: Appearances) -> torch.Tensor:
    """(B, slots) appearance index of each batch subject; -1 where the identity is unknown."""
    own = torch.full((len(keys), slots), -1, dtype=torch.long)
    for b, key in enumerate(keys):
        for n, ident in enumerate(by_key.get(key, [])[:slots]):
            if ident is not None and ident in appearances.of_identity:
                own[b, n] = appearances.of_identity[ident]
    return own
