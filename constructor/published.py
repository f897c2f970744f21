"""Published top-1 numbers of the built-in archs (each arch's ``ArchSpec.published`` reads this table).

Sources: the original ACNet repository's README (CIFAR-10, all 50,000 training images; ImageNet
ResNet-18 approximate), the ACNet paper (ResNet-56), the DBB paper's Table 2 (CIFAR rows: mean of 5
runs; its "ACNet" is its own re-run) and the OREPA paper's Table 4 (ImageNet, 120 epochs, its own
baseline and DBB re-runs). docs/reproducing.md lists the same
(its table is generated from this one by docs/tables.py).
Pure data: no torch.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PublishedResult", "PUBLISHED", "ACNET_REPO", "ACNET_PAPER", "DBB_PAPER", "OREPA_PAPER"]


@dataclass(frozen=True)
class PublishedResult:
    """Top-1 (%) reported by one source for one arch on one dataset, per block type."""

    arch: str
    dataset: str
    source: str
    top1: dict  # block type -> top-1 %

    def has(self, block_type: str) -> bool:
        return block_type in self.top1


ACNET_REPO = "ACNet repo"
ACNET_PAPER = "ACNet paper"
DBB_PAPER = "DBB paper T2"
OREPA_PAPER = "OREPA paper T4"

# Per arch, in order of preference: for an (arch, dataset, block) the first source reporting both the
# baseline and that block type is shown; an arch's first dataset is its own.
PUBLISHED: dict[str, tuple[PublishedResult, ...]] = {
    "cfqkbnc": (PublishedResult("cfqkbnc", "cifar10", ACNET_REPO, {"base": 86.20, "acb": 86.87}),),
    "vc": (PublishedResult("vc", "cifar10", ACNET_REPO, {"base": 93.99, "acb": 94.54}),
           PublishedResult("vc", "cifar10", DBB_PAPER, {"base": 93.95, "acb": 94.43, "dbb": 94.62}),
           PublishedResult("vc", "cifar100", DBB_PAPER, {"base": 74.05, "acb": 75.30, "dbb": 75.72})),
    "src56": (PublishedResult("src56", "cifar10", ACNET_REPO, {"base": 94.55, "acb": 95.06}),
              PublishedResult("src56", "cifar10", ACNET_PAPER, {"base": 94.31, "acb": 95.09})),
    "wrnc16plain": (PublishedResult("wrnc16plain", "cifar10", ACNET_REPO, {"base": 95.89, "acb": 96.33}),),
    "sres18": (PublishedResult("sres18", "imagenet", "ACNet repo (approx.)", {"base": 70.6, "acb": 71.2}),
               PublishedResult("sres18", "imagenet", DBB_PAPER, {"base": 69.54, "acb": 70.53, "dbb": 70.99}),
               PublishedResult("sres18", "imagenet", OREPA_PAPER, {"base": 71.21, "dbb": 71.77, "orepa": 72.13})),
    "sres50": (PublishedResult("sres50", "imagenet", DBB_PAPER, {"base": 76.14, "acb": 76.46, "dbb": 76.71}),
               PublishedResult("sres50", "imagenet", OREPA_PAPER, {"base": 76.70, "dbb": 76.89, "orepa": 77.31})),
    "smi1": (PublishedResult("smi1", "imagenet", DBB_PAPER, {"base": 71.89, "acb": 72.14, "dbb": 72.88}),),
}
