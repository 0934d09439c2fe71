"""Shared-prefix forward: each distinct prompt of a micro-batch forwarded once, its keys and
values expanded over the completions that share it.

Why: the G completions of a GRPO group share one prompt (chat template and question), and
on the default job prompts are ~60% of the tokens the padded per-sample forward computes
(1,200 tokens per step of which 464 completion tokens, issue 17). Forwarding the prompt
once and letting its completions attend to its cached keys/values gives the same hidden
states, hence the same loss; backpropagating through the cache sums the G completions'
gradients into the one prefix, hence the same parameter gradients. This is Prefix
Grouper's shared-prefix forward (Liu et al. 2025, "Prefix Grouper: Efficient GRPO Training
through Shared-Prefix Forward", arXiv 2506.05433, Sec. 3, Eq. 5-7: the attention of a
completion token splits into the prefix part and its own causal part), done here with the
model's own KV cache instead of a custom attention kernel, so it works with any HF causal
LM that supports ``past_key_values`` and explicit ``position_ids``.

tests/test_shared_prefix.py checks loss and every parameter's gradient against the padded
per-sample forward (float32: max abs diff <= 1e-5).
"""

from __future__ import annotations

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


def shared_prefix_hidden(model, batch) -> torch.Tensor:
    """The decoder's last hidden state at each position that predicts a completion token,
    [B, T, H], with every distinct prompt forwarded once (see the module docstring).

    For a group of g samples with prompt length P and longest completion C: one forward of
    the prompt [1, P] with a KV cache, the cache repeated g times, then one forward of the
    completions [g, C] at positions P..P+C-1 over that cache. The state that predicts
    completion token 0 is the prompt's last hidden state; token t >= 1 is predicted by the
    state of completion token t-1. Padding rows of a group (shorter completions) are
    masked out of the attention and carry zeros in the mask of the loss.

    Args:
        model: an HF causal LM (``get_decoder``).
        batch: a :class:`~dashrl.learner.batch.MicroBatch` with ``groups`` and
            ``prompt_lens`` set (``collate(..., share_prefix=True)``).

    Returns:
        float [B, T, H] in the decoder's output dtype, rows in the batch's sample order.
    """
    decoder = model.get_decoder()
    B, T = batch.targets.shape
    rows: list[torch.Tensor | None] = [None] * B
    for idx in batch.groups:
        P = int(batch.prompt_lens[idx[0]])
        lens = batch.mask[idx].sum(1).long()
        C = int(lens.max())
        prompt = batch.input_ids[idx[0] : idx[0] + 1, :P]
        out = decoder(input_ids=prompt, use_cache=True)
        cache = out.past_key_values
        cache.batch_repeat_interleave(len(idx))  # differentiable: grads sum into the prefix
        h_last = out.last_hidden_state[:, -1:]  # [1, 1, H] predicts completion token 0
        if C > 1:  # tokens 0..C-2 are the inputs that predict tokens 1..C-1
            comp = batch.input_ids[idx, P : P + C - 1]
            dev = comp.device
            comp_mask = (torch.arange(C - 1, device=dev) < (lens.to(dev) - 1)[:, None]).long()
            attn = torch.cat([torch.ones(len(idx), P, dtype=torch.long, device=dev), comp_mask],
                             dim=1)  # fmt: skip
            pos = torch.arange(P, P + C - 1, device=dev).unsqueeze(0).expand(len(idx), -1)
            h_comp = decoder(
                input_ids=comp,
                attention_mask=attn,
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state
            h = torch.cat([h_last.expand(len(idx), -1, -1), h_comp], dim=1)  # [g, C, H]
        else:
            h = h_last.expand(len(idx), -1, -1)
        if C < T:
            h = torch.nn.functional.pad(h, (0, 0, 0, T - C))
        for j, i in enumerate(idx):
            rows[i] = h[j]
    return torch.stack(rows)  # type: ignore[arg-type]  (every row is set: groups cover B)


def forwarded_tokens(batch) -> int:
    """Tokens the shared-prefix forward computes for ``batch``: each distinct prompt once,
    plus every completion token but the last (whose state predicts nothing)."""
    prompts = sum(int(batch.prompt_lens[g[0]]) for g in batch.groups)
    return prompts + int(batch.mask.sum()) - len(batch.prompt_keys)
