"""Shared-prefix forward: a micro-batch packed as the token trie of its sequences, so every
token that several samples share (a system prompt, a prompt, a completion's opening) is
forwarded once, with an attention mask that lets each token see its own ancestors only.

Why: the G completions of a GRPO group share one prompt, and the prompts of a task share
their chat template and instruction: on the default job a prompt is 46 tokens of which the
first 35 are the same for every prompt (system turn and "State the final answer to the
following arithmetic problem:"), and prompts are ~60% of the tokens a padded per-sample
forward computes (issue 17). In a causal decoder a token's hidden state depends only on the
tokens before it, so a token common to several sequences has the same state in each:
computing it once and letting every continuation attend to its keys/values gives the same
hidden states, hence the same loss; the backward pass sums the continuations' gradients
into the one shared token, hence the same parameter gradients. This is Prefix Grouper's
shared-prefix attention (Liu et al. 2025, "Prefix Grouper: Efficient GRPO Training through
Shared-Prefix Forward", arXiv 2506.05433, Sec. 3) taken from one shared prompt per group to
every shared prefix of the micro-batch, as a radix/prefix tree of the sequences (the
structure SGLang's RadixAttention keeps for its KV cache, Zheng et al. 2024, arXiv
2312.07104). Packing the trie as one sequence also removes all padding.

Layout: the trie's nodes in depth-first pre-order, one token each, with ``position_ids`` =
the node's depth (so RoPE sees each sequence's own positions). In pre-order, node k is an
ancestor of node q (or q itself) iff ``k <= q < end[k]``, where ``end[k]`` is one past k's
subtree: that is the whole attention mask. A sample's sequence in the trie is its prompt
and its completion but the last token (the last token's state predicts nothing); the state
that predicts completion token 0 is the prompt's last token's, token t >= 1 is predicted
by the state of token t-1.

Needs an HF causal LM that takes a ready 4D attention mask and explicit ``position_ids``
(transformers' sdpa and eager attention do; Llama, Qwen, Mistral...). The mask is
[L, L] for L packed tokens: fine for CPU micro-batches of hundreds of tokens; a GPU run with
micro-batches of many thousands wants a block-sparse kernel instead (FlexAttention).
tests/test_shared_prefix.py checks loss and every parameter's gradient against the padded
per-sample forward (float32: max abs diff <= 1e-5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Packed:
    """One micro-batch packed as a single sequence of L trie nodes (see the module docstring).

    Attributes:
        input_ids: int64 [1, L], the nodes' tokens in depth-first pre-order.
        position_ids: int64 [1, L], each node's depth (its position in every sequence
            through it).
        end: int64 [L], one past the last node of each node's subtree (its descendants are
            the nodes in between).
        predict: int64 [B, T] packed index of the node whose state predicts completion token
            t of sample b (0 on padding).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    end: torch.Tensor
    predict: torch.Tensor

    def to(self, device: torch.device | str) -> Packed:
        """The same layout with every tensor on ``device``."""
        return Packed(*(t.to(device, non_blocking=True) for t in (
            self.input_ids, self.position_ids, self.end, self.predict)))  # fmt: skip

    @property
    def length(self) -> int:
        """L, the tokens the forward computes (no padding, no token twice)."""
        return int(self.input_ids.shape[1])

    def attention_mask(self, implementation: str) -> torch.Tensor:
        """The [1, 1, L, L] mask, query q attending to key k iff k is q or an ancestor of q:
        bool (True = attend) for sdpa, additive float32 for eager.

        Raises:
            ValueError: an attention implementation that takes no custom mask.
        """
        idx = torch.arange(self.length, device=self.end.device)
        mask = (idx[None, :] <= idx[:, None]) & (idx[:, None] < self.end[None, :])
        if implementation == "sdpa":
            return mask[None, None]
        if implementation == "eager":
            zero = torch.zeros((), dtype=torch.float32, device=mask.device)
            return torch.where(mask, zero, torch.finfo(torch.float32).min)[None, None]
        raise ValueError(f"shared-prefix forward needs sdpa or eager attention, not "
                         f"{implementation!r} (set learner.share_prefix false)")  # fmt: skip


def pack(prompts: list[np.ndarray], completions: list[np.ndarray], T: int) -> Packed:
    """Pack a micro-batch's samples into one sequence, the token trie of their prompt +
    completion (all but the last completion token), each shared prefix once.

    Args:
        prompts: each sample's prompt token ids (at least one token each).
        completions: each sample's completion token ids (at least one token each).
        T: the micro-batch's longest completion (width of ``predict``).

    Returns:
        The :class:`Packed` layout; its nodes come in order of first appearance, so samples
        that share nothing are laid out one after another.
    """
    token: list[int] = []  # node -> its token, nodes numbered as they are created
    parent: list[int] = []  # node -> its parent node, -1 at a root
    depth: list[int] = []  # node -> its position in every sequence through it
    children: list[dict[int, int]] = []  # node -> {token: child node}
    roots: dict[int, int] = {}
    paths: list[list[int]] = []  # sample -> its nodes from the prompt's last token on
    for prompt, completion in zip(prompts, completions, strict=True):
        level, up, path = roots, -1, []
        seq = np.concatenate([prompt, completion[:-1]]).tolist()
        for i, tok in enumerate(seq):
            node = level.get(tok)
            if node is None:
                node = level[tok] = len(token)
                token.append(tok)
                parent.append(up)
                depth.append(i)
                children.append({})
            path.append(node)
            level, up = children[node], node
        paths.append(path[len(prompt) - 1 :])
    n = len(token)
    # depth-first pre-order (children in order of first appearance); a parent is always
    # created before its children, so subtree sizes add up in one backward pass
    order, stack = [], list(reversed(roots.values()))
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(reversed(children[node].values()))
    index = np.empty(n, np.int64)
    index[order] = np.arange(n)
    size = np.ones(n, np.int64)
    for node in range(n - 1, -1, -1):
        if parent[node] >= 0:
            size[parent[node]] += size[node]
    predict = np.zeros((len(paths), T), np.int64)
    for b, path in enumerate(paths):
        predict[b, : len(path)] = index[path]
    ids, pos, end = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
    ids[index], pos[index], end[index] = token, depth, index + size
    t = torch.from_numpy
    return Packed(t(ids)[None], t(pos)[None], t(end), t(predict))


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
