"""Per-call state of a routed UNet forward pass. It travels through `cross_attention_kwargs` as
`anystory=...`, never through module-level state: the reference encoding, the switches of the
call, and the routing maps each layer writes for the next layer (Eq. 7) and for the loss (Eq. 4)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch


@dataclass
class ReferenceEncoding:
    """What the encoders computed for one set of references; computed once per generation call and
    shared by every denoising step and both CFG branches.

    subject_tokens:   (B, N + 1, T, C) E_1..E_N and the background / null tokens E_{N+1} (last route)
    routing_features: (B, N + 1, d_r) R_1..R_N and the background route R_{N+1}
    bank:             block name -> (B, N, h_G * w_G, d) ReferenceNet features G_l
    valid:            (B, N) bool, False for padding subjects
    """

    subject_tokens: torch.Tensor
    routing_features: torch.Tensor
    bank: dict[str, torch.Tensor]
    valid: torch.Tensor

    @property
    def num_subjects(self) -> int:
        return self.valid.shape[1]

    @property
    def route_valid(self) -> torch.Tensor:
        """(B, N + 1): the subjects' validity and an always-valid background route."""
        background = torch.ones_like(self.valid[:, :1])
        return torch.cat([self.valid, background], dim=1)

    def repeat(self, times: int) -> ReferenceEncoding:
        """Each sample repeated `times` times (several images per prompt)."""
        return ReferenceEncoding(
            subject_tokens=self.subject_tokens.repeat_interleave(times, 0),
            routing_features=self.routing_features.repeat_interleave(times, 0),
            bank={k: v.repeat_interleave(times, 0) for k, v in self.bank.items()},
            valid=self.valid.repeat_interleave(times, 0),
        )

    def with_null_subjects(self) -> ReferenceEncoding:
        """The classifier-free-guidance branch: every subject slot gets the null tokens E_{N+1};
        routing features and ReferenceNet features stay (paper.md Section 8, item 28)."""
        null = self.subject_tokens[:, -1:].expand_as(self.subject_tokens)
        return ReferenceEncoding(null, self.routing_features, self.bank, self.valid)

    def for_cfg(self) -> ReferenceEncoding:
        """Batch [uncond ; cond], the order diffusers' SDXL pipeline concatenates its branches."""
        null = self.with_null_subjects()
        return ReferenceEncoding(
            subject_tokens=torch.cat([null.subject_tokens, self.subject_tokens]),
            routing_features=torch.cat([self.routing_features, self.routing_features]),
            bank={k: torch.cat([v, v]) for k, v in self.bank.items()},
            valid=torch.cat([self.valid, self.valid]),
        )


@dataclass
class LayerRouting:
    """Routing maps of one cross-attention layer, all (B, h * w, N + 1)."""

    hw: tuple[int, int]
    probs: torch.Tensor  # refined M_l, softmax over routes
    hard: torch.Tensor  # sigma(M_l): one-hot (straight-through Gumbel in training)
    coarse: torch.Tensor  # coarse map, softmax over routes (Fig. 6 ablation)


@dataclass
class RoutingContext:
    refs: ReferenceEncoding
    latent_hw: tuple[int, int]
    router: bool = True  # False: stage 1 / router off, every valid subject everywhere
    sampling: Literal["gumbel", "argmax"] = "argmax"
    tau: float = 1.0
    eta: float = 1.0
    gamma: float = 0.0
    subject_attention: bool = True  # the CLIP path (Eq. 5); off for the ReferenceNet-only ablation
    reference_attention: bool = True  # the ReferenceNet path (Eq. 6); off for the CLIP-only ablation
    # Routes given from outside instead of the routers' (evaluation: what a perfect router would
    # route): layer size (h, w) -> one-hot (B, h * w, N + 1). None: the routers decide.
    given_routes: Callable[[tuple[int, int]], torch.Tensor] | None = None
    maps: dict[int, LayerRouting] = field(default_factory=dict)  # layer index -> maps of that layer
    # Projected reference K/V by layer, kept across the steps of one generation call (inference
    # only: the references do not change between steps). None: compute them in every forward.
    kv_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def reference_kv(self, key: str, compute) -> tuple[torch.Tensor, torch.Tensor]:
        """compute() -> (K, V), or its cached value for this call."""
        if self.kv_cache is None or torch.is_grad_enabled():
            return compute()
        if key not in self.kv_cache:
            self.kv_cache[key] = compute()
        return self.kv_cache[key]
