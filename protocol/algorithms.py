"""The algorithm registry: one :class:`Algorithm` spec per ``--algo``, torch-free.

Everything that differs between the papers' algorithms is a field here, and every role
reads it from here instead of comparing algorithm names:

- the actor takes ``estimator`` (a key of ``dashrl.actors.advantages.ESTIMATORS``),
  ``dedupe``, ``prompt_tags`` and ``data``;
- the queue takes ``unit`` (what one buffer entry holds: a sample, or a DPO pair);
- the learner takes ``objective`` (a key of ``dashrl.learner.objectives.OBJECTIVES``),
  ``reference``, ``heads`` and ``loss_agg``, and shards a micro-batch by the same ``unit``;
- the config's ``--algo`` choices, its ``--help`` text, the README's algorithm table and
  the parametrised tests are generated from :data:`ALGORITHMS`.

Adding an algorithm that trains with an existing objective is one entry below plus, if
it needs a new selection rule, one estimator function in actors/advantages.py.
The formulas themselves are cited where they are implemented (actors/advantages.py,
learner/loss.py, learner/critic.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Objective = Literal["surrogate", "sft", "ppo", "dpo"]
Unit = Literal["sample", "pair"]


@dataclass(frozen=True)
class Algorithm:
    """What one ``--algo`` value changes, role by role.

    Attributes:
        name: the ``--algo`` value.
        estimator: advantage estimator or sample selection run by the actor on each
            group's rewards (key of ``dashrl.actors.advantages.ESTIMATORS``).
        objective: the learner's loss family: "surrogate" (clipped off-policy PPO/DAPO
            surrogate with the actor's sequence advantage), "sft" (advantage-weighted NLL),
            "ppo" (critic + GAE token advantages), "dpo" (pairs against a reference).
        unit: what the queue stores and serves as one entry, and what the learner never
            splits across ranks: "sample" (one completion) or "pair" (DPO's chosen and
            rejected completions of one prompt).
        reference: the learner keeps a frozen reference model even without a KL penalty.
        heads: extra learned heads on the policy's hidden states ("critic").
        prompt_tags: RCRL return conditioning: generate under the good tag, relabel each
            sample with the tag of its own return, evaluate under the good tag.
        dedupe: zero the advantage of a completion that repeats an earlier one of its group.
        baseline: the estimator takes ``actor.reinforce_baseline``.
        data: "samples" (the actors sample completions) or "reference_solutions" (the
            actors stream the dataset's solutions instead: supervised fine-tuning).
        loss_agg: default token aggregation when ``learner.loss_agg`` is unset.
        summary: one line on what it does (README, ``--help``).
        source: the paper it comes from.
    """

    name: str
    estimator: str
    objective: Objective
    summary: str
    source: str
    unit: Unit = "sample"
    reference: bool = False
    heads: tuple[str, ...] = ()
    prompt_tags: bool = False
    dedupe: bool = False
    baseline: bool = False
    data: Literal["samples", "reference_solutions"] = "samples"
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_sum_const"] = "token_mean"

    @property
    def unit_size(self) -> int:
        """Samples per queue entry and per indivisible learner shard (1, or 2 for a pair)."""
        return 2 if self.unit == "pair" else 1


_ALGORITHMS = (
    Algorithm(
        "grpo", "grpo", "surrogate",
        "A = (r - mean) / (std + eps) over the group; clipped surrogate, DAPO token mean "
        "and clip-higher (0.2/0.28)",
        "Shao et al. 2024; DAPO",
    ),
    Algorithm(
        "dr_grpo", "dr_grpo", "surrogate",
        "A = r - mean; token sum / max_new_tokens (constant normaliser)",
        "Liu et al. 2025 (Dr.GRPO)", loss_agg="seq_sum_const",
    ),
    Algorithm(
        "reinforce", "reinforce", "surrogate",
        "A = r (optional baseline: `--actor.reinforce-baseline group_mean` or `leave_one_out`)",
        "Minimal-RL (Xiong et al. 2025)", baseline=True,
    ),
    Algorithm(
        "reinforce_rej", "reinforce_rej", "surrogate",
        "A = r, groups all correct or all wrong dropped",
        "Minimal-RL", baseline=True,
    ),
    Algorithm(
        "raft", "max_reward", "sft",
        "SFT on each group's maximal-reward samples",
        "Minimal-RL (RAFT)",
    ),
    Algorithm(
        "raft_pp", "max_reward", "surrogate",
        "clipped surrogate with A = 1 on those samples",
        "Minimal-RL (RAFT++)",
    ),
    Algorithm(
        "expert_iteration", "correct", "sft",
        "SFT on correct, de-duplicated samples",
        "Havrilla et al. 2024 (EI)", dedupe=True,
    ),
    Algorithm(
        "ppo", "ppo_priority", "ppo",
        "value head (critic) + GAE on token rewards (sparse: reward on the last token; "
        "`--reward.dense orm` adds a learned outcome reward model as potential shaping), "
        "whitened token advantages, clipped surrogate + value loss",
        "Havrilla et al. 2024; Schulman et al. 2016/2017", heads=("critic",),
    ),
    Algorithm(
        "rcrl", "ones", "sft",
        "generate under a `[GOOD]` tag; relabel each sample `[GOOD]`/`[BAD]` by its return; "
        "SFT on all tagged samples; evaluated under `[GOOD]`",
        "Havrilla et al. 2024 (RCRL)", prompt_tags=True,
    ),
    Algorithm(
        "iterative_dpo", "dpo_pair", "dpo",
        "each group's best and worst sample form a (chosen, rejected) pair, stored and "
        "served as one unit; DPO loss against the reference model "
        "(`--learner.ref-update-every N` makes the reference follow the policy)",
        "Minimal-RL baseline; Rafailov et al. 2023 Eq. 7", unit="pair", reference=True,
    ),
    Algorithm(
        "sft", "ones", "sft",
        "actors stream reference solutions (GSM8K worked solutions) instead of samples; "
        "SFT on them: the baseline DASH compares RL with",
        "DASH (Huang et al. 2025)", data="reference_solutions",
    ),
)  # fmt: skip

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in _ALGORITHMS}
"""Every ``--algo``, in the order ``--help`` and the README list them."""

ALGORITHM_NAMES: tuple[str, ...] = tuple(ALGORITHMS)
AlgoName = Literal[ALGORITHM_NAMES]  # type: ignore[valid-type]  # the config's --algo choices


def get_algorithm(name: str) -> Algorithm:
    """The spec of ``--algo name``.

    Raises:
        ValueError: no such algorithm (the message lists the known ones).
    """
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)}") from None


def algorithm_help() -> str:
    """The ``--algo`` help text: one line per algorithm."""
    lines = [f"{a.name} ({a.source})" for a in _ALGORITHMS]
    return "Algorithm; each one's estimator, unit and objective: protocol/algorithms.py. " + (
        ", ".join(lines)
    )


def algorithm_table() -> str:
    """The README's algorithm table (markdown), generated from the registry; a test keeps
    the README's copy equal to it."""
    rows = ["| `--algo` | command | what it does | source |", "|---|---|---|---|"]
    for a in _ALGORITHMS:
        default = " (default)" if a.name == "grpo" else ""
        flags = "" if a.name == "grpo" else f" --algo {a.name}"
        if a.data == "reference_solutions":
            flags += " --data.source gsm8k --data.gsm8k-dir PATH --actor.max-new-tokens 256"
        rows.append(
            f"| `{a.name}`{default} | `python launch/start.py{flags}` | {a.summary} | {a.source} |"
        )
    return "\n".join(rows)
