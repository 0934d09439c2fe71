"""Shared-prefix forward: each distinct prompt of a micro-batch forwarded once, its
completions packed after it in one sequence, with an attention mask that lets each
completion see the prompt and its own past only.

Why: the G completions of a GRPO group share one prompt (chat template and question), and
on the default job prompts are ~60% of the tokens the padded per-sample forward computes
(1,200 tokens per step of which 464 completion tokens, issue 17). Forwarding the prompt
once and letting its completions attend to its keys/values gives the same hidden states,
hence the same loss; the backward pass then sums the G completions' gradients into the one
prefix, hence the same parameter gradients. This is Prefix Grouper's shared-prefix
attention (Liu et al. 2025, "Prefix Grouper: Efficient GRPO Training through Shared-Prefix
Forward", arXiv 2506.05433, Sec. 3: a completion token's attention splits into the prefix
part and its own causal part). Packing the completions one after another (instead of a
[G, C] batch over a cached prefix) also removes the padding between completions of
different lengths: the micro-batch is one sequence of exactly the tokens it needs.

The layout of a packed micro-batch, group by group: the prompt (positions 0..P-1), then
each completion's tokens but the last (positions P..P+C-2; the last token's state predicts
nothing). Query q may attend to key k iff both are in the same group, k comes no later
than q, and k is a prompt token or in q's own completion. The state that predicts a
completion's token 0 is the prompt's last one; token t >= 1 is predicted by the state of
its token t-1.

Needs an HF causal LM that takes a ready 4D attention mask and explicit ``position_ids``
(transformers' sdpa and eager attention do; Llama, Qwen, Mistral...).
tests/test_shared_prefix.py checks loss and every parameter's gradient against the padded
per-sample forward (float32: max abs diff <= 1e-5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def prefix_groups(prompts: list[bytes]) -> list[list[int]]:
    """Indices of the samples that share each distinct prompt, in order of first appearance.

    Args:
        prompts: each sample's prompt token ids as bytes (equal bytes = equal prompt).

    Returns:
        One index list per distinct prompt; together they cover ``range(len(prompts))``.
    """
    where: dict[bytes, list[int]] = {}
    for i, p in enumerate(prompts):
        where.setdefault(p, []).append(i)
    return list(where.values())


@dataclass
class Packed:
    """One micro-batch packed as a single sequence of L tokens (see the module docstring).

    Attributes:
        input_ids: int64 [1, L].
        position_ids: int64 [1, L] (each completion continues its prompt's positions).
        group: int64 [L] index of the prompt group of each token.
        owner: int64 [L] the sample index of a completion token, -1 for a prompt token.
        predict: int64 [B, T] packed position whose state predicts completion token t of
            sample b (0 on padding).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    group: torch.Tensor
    owner: torch.Tensor
    predict: torch.Tensor

    def to(self, device: torch.device | str) -> Packed:
        """The same layout with every tensor on ``device``."""
        return Packed(*(t.to(device, non_blocking=True) for t in (
            self.input_ids, self.position_ids, self.group, self.owner, self.predict)))  # fmt: skip

    @property
    def length(self) -> int:
        """L, the tokens the forward computes (no padding)."""
        return int(self.input_ids.shape[1])

    def attention_mask(self, implementation: str) -> torch.Tensor:
        """The [1, 1, L, L] mask: bool (True = attend) for sdpa, additive float32 for eager.

        Raises:
            ValueError: an attention implementation that takes no custom mask.
        """
        g, o = self.group, self.owner
        L = self.length
        causal = torch.ones(L, L, dtype=torch.bool, device=g.device).tril()
        mask = (g[:, None] == g[None, :]) & ((o[None, :] < 0) | (o[None, :] == o[:, None])) & causal
        if implementation == "sdpa":
            return mask[None, None]
        if implementation == "eager":
            zero = torch.zeros((), dtype=torch.float32, device=g.device)
            return torch.where(mask, zero, torch.finfo(torch.float32).min)[None, None]
        raise ValueError(f"shared-prefix forward needs sdpa or eager attention, not "
                         f"{implementation!r} (set learner.share_prefix false)")  # fmt: skip


def pack(prompts: list[np.ndarray], completions: list[np.ndarray], groups: list[list[int]],
         T: int) -> Packed:  # fmt: skip
    """Pack a micro-batch's samples, grouped by shared prompt, into one sequence.

    Args:
        prompts: each sample's prompt token ids (equal within a group).
        completions: each sample's completion token ids (at least one token each).
        groups: :func:`prefix_groups` of the samples.
        T: the micro-batch's longest completion (width of ``predict``).
    """
    ids, pos, grp, own = [], [], [], []
    predict = np.zeros((len(completions), T), np.int64)
    n = 0  # tokens packed so far
    for u, idx in enumerate(groups):
        prompt = prompts[idx[0]]
        P, start = len(prompt), n
        ids.append(prompt)
        pos.append(np.arange(P))
        grp.append(np.full(P, u))
        own.append(np.full(P, -1))
        n += P
        for j in idx:
            c = completions[j]
            C = len(c)
            predict[j, 0] = start + P - 1
            predict[j, 1:C] = n + np.arange(C - 1)
            ids.append(c[: C - 1])
            pos.append(P + np.arange(C - 1))
            grp.append(np.full(C - 1, u))
            own.append(np.full(C - 1, j))
            n += C - 1
    cat = lambda xs: torch.from_numpy(np.concatenate(xs).astype(np.int64))  # noqa: E731
    return Packed(cat(ids)[None], cat(pos)[None], cat(grp), cat(own), torch.from_numpy(predict))


def shared_prefix_hidden(model, packed: Packed) -> torch.Tensor:
    """The decoder's last hidden state at each position that predicts a completion token,
    [B, T, H], from one forward of the packed micro-batch.

    Args:
        model: an HF causal LM (``get_decoder``) with sdpa or eager attention.
        packed: the micro-batch's :class:`Packed` layout.

    Raises:
        ValueError: the model's attention implementation takes no custom mask.
    """
    decoder = model.get_decoder()
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    dev = next(model.parameters()).device
    hidden = decoder(
        input_ids=packed.input_ids.to(dev),
        attention_mask=packed.attention_mask(impl).to(dev),
        position_ids=packed.position_ids.to(dev),
    ).last_hidden_state[0]  # [L, H]
    return hidden[packed.predict.to(dev)]  # [B, T, H]
