"""What a strategy knows about the run it is part of, handed over by the core (never read from
Avalanche internals or from user-settable config fields)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RunContext:
    benchmark: str = "digits"
    n_tasks: int = 5
    classes_per_task: tuple[int, ...] = field(default_factory=tuple)
    precision: str = "fp32"          # "bf16" | "tf32" | "fp32"
    device: str = "cpu"
    backbone_depth: int = 0          # transformer blocks of the backbone (0: unknown)
    embed_dim: int = 0

    @property
    def n_classes(self) -> int:
        return sum(self.classes_per_task)

    @classmethod
    def for_backbone(cls, vit, **values) -> "RunContext":
        """A context whose backbone fields are read off a timm ViT (handy in tests)."""
        return cls(backbone_depth=len(getattr(vit, "blocks", ())),
                   embed_dim=int(getattr(vit, "num_features", 0)), **values)
