"""Group advantage estimators, computed by the actor right after scoring a group.

Pure functions on the 1-D array of the G rewards of one prompt's group. Each returns the
G advantages (float32), or None when the algorithm discards the whole group. Samples
whose advantage is 0 are then dropped by the queue's gradient filter, which is how RAFT
keeps only its best samples without a special path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from dashrl.protocol.algorithms import Algorithm


def _check(rewards: np.ndarray) -> np.ndarray:
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1 or r.size == 0 or not np.isfinite(r).all():
        raise ValueError(f"rewards must be a non-empty finite 1-D array, got {rewards!r}")
    return r


def grpo_advantages(
    rewards: np.ndarray, eps: float = 1e-6, correct: np.ndarray | None = None
) -> np.ndarray:
    """GRPO group-normalised advantage (Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300).

    A_i = (r_i - mean(r)) / (std(r) + eps), with the population std over the group.
    A group whose rewards are all equal gets A = 0 for every completion (DASH gradient
    filtering then drops it in the queue).

    Args:
        rewards: float array [G].
        eps: added to the std so a zero-variance group does not divide by zero.
        correct: ignored (the estimators that select by correctness use it).

    Returns:
        float32 array [G].

    Raises:
        ValueError: empty or non-finite rewards.
    """
    r = _check(rewards)
    return ((r - r.mean()) / (r.std() + eps)).astype(np.float32)


def dr_grpo_advantages(
    rewards: np.ndarray, eps: float = 0.0, correct: np.ndarray | None = None
) -> np.ndarray:
    """Dr.GRPO advantage: A_i = r_i - mean(r) (Liu et al. 2025, "Understanding R1-Zero-Like
    Training", arXiv 2503.20783).

    No division by the group std (which up-weights nearly-solved and nearly-failed
    prompts); Dr.GRPO pairs it with a constant length normaliser in the loss
    (``loss_agg="seq_sum_const"``). ``eps`` is accepted for a uniform signature.
    """
    r = _check(rewards)
    return (r - r.mean()).astype(np.float32)


def reinforce_advantages(
    rewards: np.ndarray,
    eps: float = 0.0,
    correct: np.ndarray | None = None,
    baseline: str = "none",
) -> np.ndarray:
    """Reinforce (Minimal-RL, Xiong et al. 2025, "Reinforce"; Williams 1992): A_i = r_i - b_i.

    Baselines: "none" (b = 0, the paper's vanilla Reinforce), "group_mean" (b = mean(r)),
    "leave_one_out" (b_i = mean of the other G - 1 rewards, RLOO; Ahmadian et al. 2024).

    Raises:
        ValueError: bad rewards or an unknown baseline.
    """
    r = _check(rewards)
    if baseline == "none":
        b = np.zeros_like(r)
    elif baseline == "group_mean":
        b = np.full_like(r, r.mean())
    elif baseline == "leave_one_out":
        b = (r.sum() - r) / max(r.size - 1, 1)
    else:
        raise ValueError(f"unknown Reinforce baseline {baseline!r}; known: {REINFORCE_BASELINES}")
    return (r - b).astype(np.float32)


REINFORCE_BASELINES = ("none", "group_mean", "leave_one_out")


def correct_mask(rewards: np.ndarray, correct: np.ndarray | None) -> np.ndarray:
    """The group's correctness [G] (bool): ``correct`` where the actor has a correctness
    signal (the correctness reward function, kept apart from shaped rewards such as a
    format bonus), else reward >= 1 (a plain 0/1 verifier reward).

    Raises:
        ValueError: ``correct`` does not have one entry per reward.
    """
    if correct is None:
        return np.asarray(rewards) >= 1.0
    c = np.asarray(correct, dtype=bool)
    if c.shape != np.shape(rewards):
        raise ValueError(f"correct has shape {c.shape}, rewards {np.shape(rewards)}")
    return c


def reinforce_rej_advantages(
    rewards: np.ndarray,
    eps: float = 0.0,
    correct: np.ndarray | None = None,
    baseline: str = "none",
) -> np.ndarray | None:
    """Reinforce-Rej (Minimal-RL, Xiong et al. 2025, arXiv 2504.11343): Reinforce where
    0 < #correct < G, else the whole group is dropped (returns None). Correctness comes
    from ``correct`` (see :func:`correct_mask`), so a format bonus cannot make a wrong
    answer count as correct."""
    r = _check(rewards)
    n = int(correct_mask(r, correct).sum())
    if n == 0 or n == r.size:
        return None
    return reinforce_advantages(r, eps, baseline=baseline)


def raft_advantages(
    rewards: np.ndarray, eps: float = 0.0, correct: np.ndarray | None = None
) -> np.ndarray | None:
    """RAFT / RAFT++ sample selection (Minimal-RL, Xiong et al. 2025, arXiv 2504.11343,
    "RAFT": keep the samples with reward 1): A_i = 1 for the group's best samples, 0 for
    the rest (dropped by the queue filter), None when there is nothing to imitate.

    With a correctness signal ``correct``: the best are the correct samples with the
    highest reward among the correct ones (a format bonus ranks correct answers but never
    makes a wrong one imitable); None when none is correct. Without it: the samples with
    the group's maximal reward, None when that is 0.

    RAFT trains on the kept samples with the SFT (NLL) loss; RAFT++ with the clipped
    importance-ratio surrogate at A = 1.
    """
    r = _check(rewards)
    if correct is None:
        return None if r.max() <= 0 else (r == r.max()).astype(np.float32)
    c = correct_mask(r, correct)
    if not c.any():
        return None
    return (c & (r == r[c].max())).astype(np.float32)


def expert_iteration_advantages(
    rewards: np.ndarray, eps: float = 0.0, correct: np.ndarray | None = None
) -> np.ndarray | None:
    """Expert Iteration selection (Havrilla et al. 2024, arXiv 2403.04642, "Expert
    Iteration"): A_i = 1 for the correct samples (:func:`correct_mask`), 0 for the rest;
    trained with the SFT loss. Duplicates are removed by :func:`dedupe_advantages` on the
    token ids. None when nothing is correct."""
    keep = correct_mask(_check(rewards), correct)
    return keep.astype(np.float32) if keep.any() else None


def dedupe_advantages(advantages: np.ndarray, completions: list[tuple[int, ...]]) -> np.ndarray:
    """Zero the advantage of every completion whose token ids repeat an earlier one in the
    group (Expert Iteration de-duplicates its kept samples, Havrilla et al. 2024)."""
    out = np.array(advantages, dtype=np.float32, copy=True)
    seen: set[tuple[int, ...]] = set()
    for i, c in enumerate(completions):
        if c in seen:
            out[i] = 0.0
        seen.add(c)
    return out


def ppo_priority(
    rewards: np.ndarray, eps: float = 0.0, correct: np.ndarray | None = None
) -> np.ndarray:
    """PPO with a critic (Havrilla et al. 2024): the learner computes token-level advantages
    with GAE (learner/critic.py); the actor only sends r_i - mean(r) as the sample's queue
    priority (the DASH informativeness signal). With the default filter threshold 0 the
    queue drops groups whose rewards are all equal; ``--queue.filter-threshold None`` feeds
    them to the critic as well."""
    return dr_grpo_advantages(rewards)


def dpo_pair(
    rewards: np.ndarray, eps: float = 0.0, correct: np.ndarray | None = None
) -> np.ndarray | None:
    """Iterative DPO pair selection (Minimal-RL baseline, Xiong et al. 2025; online DPO):
    A = +1 on the group's best sample (chosen), -1 on its worst (rejected), 0 elsewhere; the
    queue serves the +1/-1 samples as one unit. None when all rewards are equal (no
    preference). Ties go to the first sample."""
    r = _check(rewards)
    if r.max() == r.min():
        return None
    out = np.zeros(r.size, np.float32)
    out[int(r.argmax())], out[int(r.argmin())] = 1.0, -1.0
    return out


def ones(rewards: np.ndarray, eps: float = 0.0, correct: np.ndarray | None = None) -> np.ndarray:
    """Weight 1 on every sample: plain imitation of whatever the actor sends. SFT on
    reference solutions (DASH's baseline, Huang et al. 2025) and Return-Conditioned RL
    (Havrilla et al. 2024, "RCRL"): every sample is imitated under a prompt tagged with its
    own return (actors/actor.py splits each group into a "[GOOD]" and a "[BAD]" part); at
    generation time the prompt carries the good tag."""
    return np.ones(len(_check(rewards)), np.float32)


Estimator = Callable[..., "np.ndarray | None"]
"""(rewards [G], eps, correct [G] bool or None) -> advantages [G] float32, or None (drop)."""


def estimator_for(algo: Algorithm, reinforce_baseline: str = "none") -> Estimator:
    """The estimator of an algorithm (protocol/algorithms.py), with its options bound (the
    Reinforce baseline when ``algo.baseline``)."""
    fn = ESTIMATORS[algo.estimator]
    return functools.partial(fn, baseline=reinforce_baseline) if algo.baseline else fn


ESTIMATORS: dict[str, Estimator] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "reinforce": reinforce_advantages,
    "reinforce_rej": reinforce_rej_advantages,
    "max_reward": raft_advantages,
    "correct": expert_iteration_advantages,
    "ppo_priority": ppo_priority,
    "dpo_pair": dpo_pair,
    "ones": ones,
}
"""Advantage estimators and sample selections by name (``Algorithm.estimator``)."""
