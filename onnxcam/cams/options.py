"""Checks of the user's method options and feature-map selections, shared by methods and moments.

Kept apart from the numerics so that a bad option fails with one clear line before any work.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Sequence

from ..errors import OptionError, TargetError

NUMERATORS = ("D2", "D1")
DENOMINATORS = ("sum", "weighted")
AVERAGINGS = ("moments", "maps")


def choose_option(option: str, value: object, allowed: Sequence[str]) -> str:
    """Return the canonical spelling of ``value`` among ``allowed`` (case-insensitive)."""
    if isinstance(value, str):
        for candidate in allowed:
            if value.strip().lower() == candidate.lower():
                return candidate
    choices = " or ".join(allowed)
    raise OptionError(f"{option} {value!r} is not known: choose {choices}")


def check_feature_maps(feature_maps: Sequence[int] | None) -> tuple[int, ...] | None:
    """Validate a channel selection whose range can only be checked once K is known."""
    if feature_maps is None:
        return None
    if isinstance(feature_maps, (str, bytes)) or not hasattr(feature_maps, "__iter__"):
        raise TargetError(
            f"feature_maps {feature_maps!r} is not a list of channel indices: give e.g. [0, 5, 7]"
        )
    indices = []
    for index in feature_maps:
        if isinstance(index, bool) or not isinstance(index, Integral):
            raise TargetError(
                f"feature map index {index!r} is not an integer: give channel indices such as 0, 5, 7"
            )
        if index < 0:
            raise TargetError(
                f"feature map index {int(index)} is negative: give channel indices from 0 to K-1"
            )
        indices.append(int(index))
    if not indices:
        raise TargetError("feature_maps is empty: give at least one channel index, or none for all")
    if len(set(indices)) != len(indices):
        raise TargetError(f"feature_maps {indices} repeats a channel: give each index once")
    return tuple(indices)


def check_feature_maps_in_range(feature_maps: tuple[int, ...] | None, n_channels: int) -> None:
    """Fail on a channel index the target layer does not have."""
    if feature_maps is None:
        return
    too_large = [index for index in feature_maps if index >= n_channels]
    if too_large:
        raise TargetError(
            f"feature map index {too_large[0]} is out of range: the target layer has "
            f"{n_channels} channels (use 0 to {n_channels - 1})"
        )


@dataclass(frozen=True)
class PlusPlusSettings:
    """The Grad-CAM++ choices that shape a per-sample map ('maps' averaging needs them up front)."""

    numerator: str = "D2"
    denominator: str = "sum"
    feature_maps: tuple[int, ...] | None = None

    @classmethod
    def checked(cls, numerator: object = "D2", denominator: object = "sum",
                feature_maps: Sequence[int] | None = None) -> "PlusPlusSettings":
        return cls(
            numerator=choose_option("numerator", numerator, NUMERATORS),
            denominator=choose_option("denominator", denominator, DENOMINATORS),
            feature_maps=check_feature_maps(feature_maps),
        )
