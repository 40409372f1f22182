"""The checks of a request: refuse (ValueError, with the reason) what cannot work, before any work.

    check_request(config, n_forget, n_retain)  # the settings, the set sizes, K
    check_sets(forget, retain)                 # the sets' contents
    check_range("steps", steps, 1, 1000)       # one setting against its bounds

They live here, not in the engine, because they run before anything trains and in code that
never trains: the app's jobs check a request before they queue (`check_request`), and the
evaluation settings and the app's Space limits check their numbers (`check_range`) without the
training loop. One home for the checks means a bad request gets the same message wherever it
comes from. A request refused here raises ValueError; what a started run raises is in `errors`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .neighbours import check_neighbour_count
from .objectives import METHODS

if TYPE_CHECKING:  # the engine imports this module, so the config is named for type checkers only
    from .engine import UnlearnConfig


def check_range(label: str, value: float, low: float, high: float, *, open_low: bool = False,
                open_high: bool = False) -> None:
    """Refuse (ValueError) a setting outside [low, high]; open_low/open_high exclude an end."""
    above = value > low if open_low else value >= low
    below = value < high if open_high else value <= high
    if not (above and below):
        left, right = "(" if open_low else "[", ")" if open_high else "]"
        shown_high = "2**32" if high == 2**32 else str(high)
        raise ValueError(f"{label} must lie in {left}{low}, {shown_high}{right}, got {value}")


def check_request(config: UnlearnConfig, n_forget: int, n_retain: int, *, neighbours_given: bool = False) -> None:
    """The one check of an unlearning request, before any work: the settings
    (`UnlearnConfig.validate`), the set sizes, and K against the retain set
    (`neighbours.check_neighbour_count`; for methods that use neighbours, unless they are given).
    The library (`unlearn`, `split.unlearn_prompt`), the CLI and the app all call it, so a bad
    request gets the same message wherever it comes from. Raises ValueError."""
    config.validate()
    if n_forget == 0:
        raise ValueError("the forget set is empty: choose at least one image to forget")
    if n_retain == 0:
        raise ValueError("the retain set is empty")
    uses_retain_neighbours = METHODS[config.method].needs_neighbours and not neighbours_given
    check_neighbour_count(config.k, n_retain if uses_retain_neighbours else None)


def check_sets(forget: Tensor, retain: Tensor) -> None:
    """Refuse set contents the method cannot use (mismatched, non-finite, overlapping); their
    sizes are `check_request`'s."""
    if forget.shape[1:] != retain.shape[1:]:
        raise ValueError(f"forget items {tuple(forget.shape[1:])} and retain items {tuple(retain.shape[1:])} differ in shape")
    if not (torch.isfinite(forget).all() and torch.isfinite(retain).all()):
        raise ValueError("the forget or retain data contain NaN/inf values")
    forget_rows = {forget[i].numpy().tobytes() for i in range(forget.shape[0])}
    overlap = sum(retain[i].numpy().tobytes() in forget_rows for i in range(retain.shape[0]))
    if overlap == retain.shape[0]:
        raise ValueError("the retain set holds only forget items: nothing would be left to learn from")
    if overlap:
        raise ValueError(f"{overlap} retain item(s) are copies of forget items; remove them from the retain set")
