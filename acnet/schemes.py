"""Naming schemes: recognise a state dict written by other code and translate it to ours (and back).

A :class:`NamingScheme` is a pure name/shape map between a *foreign* state dict (e.g. the files the
original ACNet or DBB repositories write) and *ours* (the state dict of one of our models). It is a
list of :class:`Rule` s, each relating a few foreign entries to a few of ours:

==============  ==================================================  ===============================
rule kind       foreign -> ours (import)                            ours -> foreign (export)
==============  ==================================================  ===============================
``copy``        ``ours = theirs`` (same shape)                      ``theirs = ours``
``fuse_bn``     conv ``W`` + BN ``(g, b, m, v)`` -> conv ``(W', b')``  ``W``, an identity BN holding b'
                ``W' = W * g / sqrt(v + eps)``,                     (``m = 0``, ``v = 1 - eps``,
                ``b' = b - m * g / sqrt(v + eps)`` (float64)        ``g = sqrt(v + eps)``)
``zero_bias``   conv ``W`` -> conv ``(W, 0)``                       ``W`` (the bias must be 0)
==============  ==================================================  ===============================

:func:`recognise` matches a state dict to exactly one scheme by its entry names (every name of
the scheme present, no other name except the scheme's ``ignored`` metadata entries), then checks
every shape. A state dict matching no scheme raises :class:`acnet.WeightsError` naming the closest
scheme and what differs. The architecture-specific tables (which foreign name is which of ours)
live with the architectures, not here: this module knows no model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .weights import WeightsError

__all__ = ["Rule", "NamingScheme", "recognise", "closest_scheme", "describe_difference", "BN_ENTRIES"]

Shape = Tuple[int, ...]
StateDict = Dict[str, Tensor]

#: The entries of a ``BatchNorm2d`` in a state dict, in the order :class:`Rule` ``fuse_bn`` lists them.
BN_ENTRIES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_KINDS = ("copy", "fuse_bn", "zero_bias")


@dataclass(frozen=True)
class Rule:
    """Foreign entries ``theirs`` <-> our entries ``ours``, by ``kind`` (module docstring).

    ``copy``: one name each. ``fuse_bn``: ``theirs = (conv.weight, bn.weight, bn.bias,
    bn.running_mean, bn.running_var, bn.num_batches_tracked)``, ``ours = (weight, bias)``.
    ``zero_bias``: ``theirs = (weight,)``, ``ours = (weight, bias)``. ``eps``: the foreign BN's eps.
    """

    kind: str
    theirs: Tuple[str, ...]
    ours: Tuple[str, ...]
    eps: float = 1e-5

    def __post_init__(self) -> None:
        sizes = {"copy": (1, 1), "fuse_bn": (6, 2), "zero_bias": (1, 2)}
        if self.kind not in _KINDS:
            raise ValueError(f"unknown rule kind {self.kind!r}; valid kinds: {', '.join(_KINDS)}")
        if (len(self.theirs), len(self.ours)) != sizes[self.kind]:
            raise ValueError(f"a {self.kind} rule relates {sizes[self.kind][0]} foreign and "
                             f"{sizes[self.kind][1]} own entries, got {self.theirs} / {self.ours}")


@dataclass(frozen=True)
class NamingScheme:
    """A foreign naming scheme for one of our models.

    ``name``: short id (e.g. ``"dbb/DBB/train"``); ``description``: one line for messages (which
    code writes such files, and for which model); ``rules``: the map; ``their_shapes`` /
    ``our_shapes``: every entry's shape on each side; ``ignored``: foreign metadata entries that
    may be present and carry no weight (e.g. ACNet's ``deps``); ``info``: free-form facts for the
    caller (e.g. which of our models the translation loads into).
    """

    name: str
    description: str
    rules: Tuple[Rule, ...]
    their_shapes: Mapping[str, Shape]
    our_shapes: Mapping[str, Shape]
    ignored: FrozenSet[str] = frozenset()
    info: Mapping[str, object] = field(default_factory=dict)

    @property
    def their_names(self) -> FrozenSet[str]:
        return frozenset(self.their_shapes)

    def matches_names(self, names: Sequence[str]) -> bool:
        """Every entry of the scheme is there and nothing else (but ``ignored`` metadata)."""
        present = set(names) - self.ignored
        return present == set(self.their_shapes)

    def shape_problems(self, state: Mapping[str, Tensor]) -> List[str]:
        """``"name: file (a, b) vs expected (c, d)"`` for every entry whose shape differs."""
        return _shape_problems(state, self.their_shapes)

    def to_ours(self, state: Mapping[str, Tensor]) -> StateDict:
        """Our state dict from a foreign one that matches this scheme (names and shapes checked)."""
        _require(state, self.their_shapes, f"the weights do not fit {self.description}")
        result: StateDict = {}
        for rule in self.rules:
            values = [state[k] for k in rule.theirs]
            if rule.kind == "copy":
                result[rule.ours[0]] = values[0]
            elif rule.kind == "zero_bias":
                weight = values[0]
                result[rule.ours[0]] = weight
                result[rule.ours[1]] = weight.new_zeros(weight.shape[0])
            else:
                result[rule.ours[0]], result[rule.ours[1]] = _fuse(values[:5], rule.eps)
        return result

    def from_ours(self, state: Mapping[str, Tensor]) -> StateDict:
        """The foreign state dict holding our ``state`` (every rule inverted; see the module docstring).

        Raises :class:`acnet.WeightsError` when ``state`` lacks an entry or has a wrong shape, or when a
        ``zero_bias`` conv has a bias that is not zero (the foreign model has no place for it).
        """
        _require(state, self.our_shapes, f"the weights cannot be written as {self.description}")
        result: StateDict = {}
        for rule in self.rules:
            values = [state[k] for k in rule.ours]
            if rule.kind == "copy":
                result[rule.theirs[0]] = values[0]
            elif rule.kind == "zero_bias":
                if bool(values[1].detach().ne(0).any()):
                    raise WeightsError(
                        f"{rule.ours[1]} is not zero, but {self.description} has no bias for that conv "
                        f"({rule.theirs[0]}): these weights cannot be written in that format")
                result[rule.theirs[0]] = values[0]
            else:
                weight, bias = values
                result.update(zip(rule.theirs, _identity_bn(weight, bias, rule.eps)))
        return result


def _shape_problems(state: Mapping[str, Tensor], shapes: Mapping[str, Shape]) -> List[str]:
    return [f"{k}: file {tuple(state[k].shape)} vs expected {shape}"
            for k, shape in shapes.items() if k in state and tuple(state[k].shape) != shape]


def _require(state: Mapping[str, Tensor], shapes: Mapping[str, Shape], what: str) -> None:
    """Every entry of ``shapes`` in ``state`` with its shape, else one :class:`acnet.WeightsError` (``what: ...``)."""
    missing = sorted(set(shapes) - set(state))
    problems = _shape_problems(state, shapes)
    if missing or problems:
        raise WeightsError(f"{what}: " + describe_difference(missing, [], problems))


def _fuse(values: Sequence[Tensor], eps: float) -> Tuple[Tensor, Tensor]:
    """``(W * g / sqrt(v + eps), b - m * g / sqrt(v + eps))`` in float64, returned in ``W``'s dtype."""
    weight, gamma, beta, mean, var = (v.detach().to(torch.float64) for v in values)
    scale = gamma / torch.sqrt(var + eps)
    dtype = values[0].dtype
    return (weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))).to(dtype), (beta - mean * scale).to(dtype)


def _identity_bn(weight: Tensor, bias: Tensor, eps: float) -> Tuple[Tensor, ...]:
    """Conv weight and the BN entries with ``bn(y) = y + bias`` in eval mode (to rounding)."""
    n = bias.shape[0]
    var = 1.0 - eps if eps < 1.0 else 0.0
    dtype = bias.dtype
    return (weight, torch.full((n,), math.sqrt(var + eps), dtype=dtype), bias.detach().clone(),
            torch.zeros(n, dtype=dtype), torch.full((n,), var, dtype=dtype), torch.zeros((), dtype=torch.int64))


def describe_difference(missing: Sequence[str], unexpected: Sequence[str], shapes: Sequence[str] = (),
                        limit: int = 4) -> str:
    """``"missing 2 entries: a, b; unexpected 1 entry: c; 1 shape mismatch: ..."`` (lists cut at ``limit``)."""
    def listing(label: str, items: Sequence[str]) -> str:
        more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
        noun = "entry" if len(items) == 1 else "entries"
        if label == "shape mismatch":
            return f"{len(items)} shape mismatch{'es' if len(items) > 1 else ''}: " + "; ".join(items[:limit]) + more
        return f"{label} {len(items)} {noun}: " + ", ".join(items[:limit]) + more
    parts = [listing(label, list(items)) for label, items in
             (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if items]
    return "; ".join(parts) or "no difference"


def closest_scheme(names: Sequence[str], schemes: Sequence[NamingScheme]) -> Tuple[NamingScheme, List[str], List[str]]:
    """The scheme whose names differ least from ``names``: ``(scheme, missing, unexpected)``."""
    if not schemes:
        raise ValueError("closest_scheme: no schemes given")
    present = set(names)

    def difference(scheme: NamingScheme) -> Tuple[List[str], List[str]]:
        expected = set(scheme.their_shapes)
        return sorted(expected - present), sorted(present - expected - scheme.ignored)

    best = min(schemes, key=lambda s: sum(map(len, difference(s))))
    missing, unexpected = difference(best)
    return best, missing, unexpected


def recognise(state: Mapping[str, Tensor], schemes: Sequence[NamingScheme], source: str = "the weights"
              ) -> Optional[NamingScheme]:
    """The one scheme whose names ``state`` has exactly, its shapes checked; ``None`` if no name set matches.

    Raises :class:`acnet.WeightsError` when the names match a scheme but a shape differs (naming the
    entries), or when the names match several schemes with different translations (ambiguous).
    """
    matching = [s for s in schemes if s.matches_names(list(state))]
    if not matching:
        return None
    fitting = [s for s in matching if not s.shape_problems(state)]
    if not fitting:
        best = min(matching, key=lambda s: len(s.shape_problems(state)))
        raise WeightsError(f"{source} has the entry names of {best.description}, but not its shapes: "
                           + describe_difference([], [], best.shape_problems(state)))
    if len({(s.rules, tuple(sorted(s.our_shapes.items()))) for s in fitting}) > 1:
        raise WeightsError(f"{source} fits several naming schemes ({', '.join(s.name for s in fitting)}); "
                           "cannot tell which one wrote it")
    return fitting[0]
