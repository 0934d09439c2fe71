"""dashrl: asynchronous streaming RL for language-model reasoning.

Actors generate and score groups of completions, a priority replay queue ranked by
|advantage| keeps the informative ones (DASH gradient filtering), and a learner takes
PPO-style off-policy steps on fixed-size micro-batches and broadcasts weights back.
Import sub-packages as ``dashrl.<folder>``.
"""

__version__ = "0.1.0"
