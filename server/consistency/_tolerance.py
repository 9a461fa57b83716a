"""How two sets of numbers are judged: bit-exact, or within atol + rtol * |reference| and a
cosine floor. One type for the consistency checks, the cache audit and the parity report."""

from __future__ import annotations

from dataclasses import dataclass

from ..models import Manifest


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    min_cosine: float
    exact: bool = False

    @classmethod
    def of(cls, manifest: Manifest, exact: bool = False) -> Tolerance:
        """The manifest's consistency tolerance, or exact equality."""
        c = manifest.consistency
        return cls(c.atol, c.rtol, c.min_cosine, exact)

    @classmethod
    def between(cls, a: Manifest, b: Manifest) -> Tolerance:
        """For comparing two models: the looser of the two manifests' tolerances."""
        ca, cb = a.consistency, b.consistency
        return cls(max(ca.atol, cb.atol), max(ca.rtol, cb.rtol), min(ca.min_cosine, cb.min_cosine))

    def exceeded(self, max_abs: float, scale: float, min_cosine: float) -> bool:
        """Whether a difference of `max_abs` at magnitude `scale`, or a cosine, is out of bounds."""
        if self.exact:
            return max_abs != 0.0
        return not (max_abs <= self.atol + self.rtol * scale and min_cosine >= self.min_cosine)

    def describe(self) -> str:
        if self.exact:
            return "exact"
        return f"|d| <= {self.atol:g} + {self.rtol:g}*|ref|, cosine >= {self.min_cosine:g}"


EXACT = Tolerance(0.0, 0.0, 1.0, exact=True)
