"""Per-call state of a routed UNet forward pass. It travels through `cross_attention_kwargs` as
`anystory=...`, never through module-level state: the reference encoding, the switches of the
call, and the routing maps each layer writes for the next layer (Eq. 7) and for the loss (Eq. 4).

Everything that depends on the data but not on the layer's input (validity of subjects, the
routers' per-route projections, attention-mask skeletons) is settled once per context: on the
host when it is built, or on the device at the first layer that needs it. No layer reads a device
value back to the host, so a denoising step never waits for the GPU queue to drain."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch


@dataclass
class ReferenceEncoding:
    """What the encoders computed for one set of references; computed once per generation call and
    shared by every denoising step and both CFG branches.

    subject_tokens:   (B, N + 1, T, C) E_1..E_N and the background / null tokens E_{N+1} (last route)
    routing_features: (B, N + 1, d_r) R_1..R_N and the background route R_{N+1}
    bank:             block name -> (B, N, h_G * w_G, d) ReferenceNet features G_l
    valid:            (B, N) bool, False for padding subjects
    all_valid:        whether every subject is valid, known on the host (the inference pipeline and
                      the training batch know it before anything reaches the GPU). None: unknown;
                      the layers then apply `valid` as a mask instead of skipping it.
    """

    subject_tokens: torch.Tensor
    routing_features: torch.Tensor
    bank: dict[str, torch.Tensor]
    valid: torch.Tensor
    all_valid: bool | None = None

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
            all_valid=self.all_valid,
        )

    def with_null_subjects(self) -> ReferenceEncoding:
        """The classifier-free-guidance branch: every subject slot gets the null tokens E_{N+1};
        routing features and ReferenceNet features stay (paper.md Section 8, item 28)."""
        null = self.subject_tokens[:, -1:].expand_as(self.subject_tokens)
        return replace(self, subject_tokens=null)

    def for_cfg(self) -> ReferenceEncoding:
        """Batch [uncond ; cond], the order diffusers' SDXL pipeline concatenates its branches."""
        null = self.with_null_subjects()
        return ReferenceEncoding(
            subject_tokens=torch.cat([null.subject_tokens, self.subject_tokens]),
            routing_features=torch.cat([self.routing_features, self.routing_features]),
            bank={k: torch.cat([v, v]) for k, v in self.bank.items()},
            valid=torch.cat([self.valid, self.valid]),
            all_valid=self.all_valid,
        )


@dataclass
class LayerRouting:
    """Routing maps of one cross-attention layer over the N + 1 routes. The layer keeps only what
    routing needs (the chosen route per position, and its logits); probabilities and one-hot maps
    are derived on demand, for the losses and the pictures.

    route:         (B, h * w) long, the route each position takes (argmax, Gumbel sample, or given)
    logits:        (B, h * w, N + 1) refined logits M_l; None for given routes
    coarse_logits: (B, h * w, N + 1) coarse logits (Fig. 6 ablation); None for given routes
    gate:          (B, h * w, N + 1) one-hot that gated the layer, with the straight-through
                   gradient of Gumbel sampling in training, or the given routes; None at inference
    """

    hw: tuple[int, int]
    route: torch.Tensor
    num_routes: int
    logits: torch.Tensor | None = None
    coarse_logits: torch.Tensor | None = None
    gate: torch.Tensor | None = None

    @property
    def hard(self) -> torch.Tensor:
        """sigma(M_l): one-hot (B, h * w, N + 1)."""
        if self.gate is not None:
            return self.gate
        ids = torch.arange(self.num_routes, device=self.route.device)
        dtype = self.logits.dtype if self.logits is not None else torch.float32
        return (self.route[..., None] == ids).to(dtype)

    @property
    def probs(self) -> torch.Tensor:
        """Refined map, softmax over routes (the given one-hot routes when there is no router)."""
        return self.logits.float().softmax(-1) if self.logits is not None else self.hard.float()

    @property
    def coarse(self) -> torch.Tensor:
        """Coarse map, softmax over routes."""
        return self.coarse_logits.float().softmax(-1) if self.coarse_logits is not None else self.probs

    def rows(self, rows: slice, device: torch.device | str | None = None) -> LayerRouting:
        """The maps of some samples, detached (and moved): what a recorder keeps."""

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows].detach().to(device or t.device)

        return LayerRouting(self.hw, take(self.route), self.num_routes, take(self.logits),
                            take(self.coarse_logits), take(self.gate))

    @classmethod
    def from_routes(cls, hw: tuple[int, int], routes: torch.Tensor) -> LayerRouting:
        """Maps given as one-hot routes (B, h * w, N + 1): ground truth or a test's fixture."""
        return cls(hw, routes.argmax(-1), routes.shape[-1], gate=routes)


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
    # Per-call values of each layer (projected reference K/V, the text K/V, the router's per-route
    # projections), kept across the steps of one generation call: the references and the prompt do
    # not change between steps. None: computed in every forward (training, where they carry
    # gradients and a context serves one forward).
    cache: dict[str, Any] | None = None
    # Shape-only tensors (mask skeletons, route ids): they hold no gradient and depend only on the
    # context, so they are always kept for its lifetime and shared by the layers of one size.
    layouts: dict[Any, torch.Tensor] = field(default_factory=dict)

    def per_call(self, key: str, compute: Callable[[], Any]) -> Any:
        """compute(), or its cached value for this call (never cached while building a graph)."""
        if self.cache is None or torch.is_grad_enabled():
            return compute()
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def layout(self, key: Any, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self.layouts:
            self.layouts[key] = compute()
        return self.layouts[key]
