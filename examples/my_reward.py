"""An example reward function for dashrl: ``--reward.fns examples/my_reward.py:reward``.

dashrl calls it once per completion as ``reward(prompt, completion, **fields)``: ``prompt``
is the question text, ``completion`` the model's decoded answer, and ``fields`` the
dataset row's other columns plus ``answer`` (the reference answer) and ``finished`` (the
completion ended on its own rather than at the token limit). Return a float (1.0 for a
correct answer, by dashrl's convention for "correct"), or None when it cannot judge.
An exception, a NaN or a hang past --actor.verifier-timeout-s scores 0 and is counted.
"""

from __future__ import annotations

import re

_ANSWER = re.compile(r"answer is\s*(-?\d+)", re.IGNORECASE)


def reward(prompt: str, completion: str, answer: str, **fields) -> float | None:
    """1.0 when the completion says "the answer is N" with the reference N, else 0.0;
    falls back to the last integer in the completion when that phrase is missing."""
    found = _ANSWER.findall(completion) or re.findall(r"-?\d+", completion)
    if not found:
        return 0.0
    return 1.0 if found[-1] == str(answer).strip() else 0.0
