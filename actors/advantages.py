"""Group advantage estimators, computed by the actor right after scoring a group.

Pure functions on a 1-D array of the G rewards of one prompt's group.
"""

from __future__ import annotations

import numpy as np


def grpo_advantages(rewards: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """GRPO group-normalised advantage (Shao et al. 2024; ../shared/papers.md "Formulas").

    A_i = (r_i - mean(r)) / (std(r) + eps), with the population std over the group.
    A group whose rewards are all equal gets A = 0 for every completion (DASH gradient
    filtering then drops it in the queue).

    Args:
        rewards: float array [G].
        eps: added to the std so a zero-variance group does not divide by zero.

    Returns:
        float32 array [G].

    Raises:
        ValueError: empty or non-finite rewards.
    """
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1 or r.size == 0 or not np.isfinite(r).all():
        raise ValueError(f"rewards must be a non-empty finite 1-D array, got {rewards!r}")
    return ((r - r.mean()) / (r.std() + eps)).astype(np.float32)
