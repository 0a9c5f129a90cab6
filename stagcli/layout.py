"""`Layout`: how a decoder's layers become staggered sections. One frozen dataclass, declared once:
`stag convert` builds its options from it, recipes and experiment variants are checked against it,
and a StagConfig stores it (and gives it back with `StagConfig.layout`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from .cross_attention import FORMS
from .errors import StagError
from .options import check_choices, from_dict, option
from .section_input import BRIDGES, INITS

MODES = ("split", "shared", "verify", "exact-cache")
VERIFY_LAYOUTS = ("verify", "exact-cache")  # the source split in two halves, a bridge drafting


@dataclass(frozen=True)
class Layout:
    sections: int = option(2, "Number of staggered sections p. split: must divide the layer count; "
                              "shared: number of passes.", flags=("--sections", "-p"))
    mode: str = option("split", "split: layers 1..L/p form section 1, the next L/p section 2, ... (separate "
                                "weights). shared: every section is a pass through all L layers (shared "
                                "weights); with zero cross-attention it reproduces the source exactly. verify: "
                                "the source itself, split in two sections that decode at the same time and check "
                                "each other: the source's exact output, faster by how often the --bridge's draft "
                                "is right (stag generate / bench; docs/performance.md). exact-cache: the verify layout, its "
                                "drafts emitted unverified: section 2 still rewrites each position with its exact input "
                                "one step later, so only the current position is predicted (better than split, one "
                                "extra row in section 2 per step; docs/bridge.md).",
                       choices=MODES)
    window: Optional[int] = option(None, "Bounded cross-attention: a section sees only the previous W "
                                         "outputs of the section below (default: all).")
    init: str = option("zero", "What section k>1 reads as its input. zero: the token embedding, with a "
                               "zero-output cross-attention (the paper's form). lagged: also u(i-1) - "
                               "E(x(i-1)) from the section below, approximating the missing lower layers "
                               "(split mode only).", choices=INITS)
    bridge: Optional[str] = option(None, "Predict what section k>1 lost (the source's residual stream at the "
                                         "boundary) from what it may see: ridge, a linear map fitted in closed form "
                                         "on --calibrate text; mlp, the same plus an MLP over the current and previous position; attn, the "
                                         "same plus one decoder layer attending over earlier positions (the strongest). "
                                         "Train mlp and attn with stag finetune --train bridge (docs/bridge.md). Split, "
                                         "verify and exact-cache modes.", choices=BRIDGES)
    bridge_depth: int = option(0, "verify and exact-cache modes: the bridge reads the current token after K of section "
                                  "1's layers (the source's own residual h^K) instead of its embedding. Better drafts "
                                  "(docs/bridge.md, 'How deep?': an attention bridge trained 60 min on the CPU gives "
                                  "1.27x / 1.18x / 1.11x the source's perplexity on KJV at K = 0 / 4 / 8), but "
                                  "section 2 starts K layers after section 1: a step is "
                                  "K + L/2 layers deep instead of L/2 (on CUDA the rest of section 1 and section 2 "
                                  "run on two streams at once; elsewhere one after the other). 0: the embedding.")
    cross_attn: str = option("sequential", "Where cross-attention sits in a layer. sequential: the paper's "
                                           "extra sublayer after self-attention (own norm, query and output "
                                           "projections). parallel: it reads the same norm(x) as self-attention, "
                                           "its query joins the qkv GEMM and its output the o GEMM (fewer "
                                           "kernels per decode step).", choices=tuple(FORMS))

    def __post_init__(self):
        check_choices(self)

    @classmethod
    def from_dict(cls, values: dict, where: str = "layout") -> "Layout":
        return from_dict(cls, values, where)

    @property
    def shared(self) -> bool:
        return self.mode == "shared" and self.sections > 1

    def validate(self, num_layers: int) -> "Layout":
        """The layout, or a StagError naming the option that cannot work with this model."""
        if self.sections < 1:
            raise StagError(f"--sections must be >= 1, not {self.sections}")
        if self.mode in VERIFY_LAYOUTS:
            if self.sections != 2 or not self.bridge or self.window is not None:
                raise StagError(f"--mode {self.mode} takes --sections 2 and a --bridge (ridge, mlp or attn), no --window")
            if num_layers % 2:
                raise StagError(f"--mode {self.mode} splits the model's {num_layers} layers in two halves: needs an even count")
        if self.mode == "split" and num_layers % self.sections:
            raise StagError(f"--sections {self.sections} does not divide the model's {num_layers} layers")
        if self.window is not None and self.window < 1:
            raise StagError(f"--window must be >= 1, not {self.window}")
        if self.init == "lagged" and (self.mode != "split" or self.sections < 2):
            raise StagError("--init lagged applies to --mode split with --sections >= 2")
        if self.bridge and (self.mode == "shared" or self.sections < 2):
            raise StagError("--bridge applies to --mode split with --sections >= 2 (a shared or 1-section model "
                            "has no missing input to predict)")
        if self.bridge_depth and self.mode not in VERIFY_LAYOUTS:
            raise StagError("--bridge-depth applies to --mode verify and exact-cache (split sections decode in lockstep "
                            "from the first layer)")
        if self.bridge_depth < 0 or (self.bridge_depth and self.bridge_depth >= num_layers // 2):
            raise StagError(f"--bridge-depth must be in 0..{num_layers // 2 - 1} (section 1 has {num_layers // 2} "
                            f"layers), not {self.bridge_depth}")
        if self.bridge and self.init != "zero":
            raise StagError("--bridge replaces --init; give one of them")
        return self

    def config_fields(self) -> dict:
        """The StagConfig fields that carry this layout."""
        verified = self.mode in VERIFY_LAYOUTS
        return dict(sections=self.sections, shared=self.shared, window=self.window,
                    section_input=self.bridge or self.init, cross_attn="none" if verified else self.cross_attn,
                    exact_first=self.mode != "shared" and self.sections > 1, verified=verified,
                    exact_cache=self.mode == "exact-cache", bridge_depth=self.bridge_depth)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = tuple(f.name for f in dataclasses.fields(Layout))
