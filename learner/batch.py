"""Collate queue samples into padded tensors and compute the policy's token logprobs.

Sequences are right-padded prompt+completion. The LM head is applied only at the
positions that predict completion tokens (a 49k-vocab head over prompt positions
would be ~10% of the forward cost for nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from dashrl.learner.prefix import Packed, pack, shared_prefix_hidden
from dashrl.protocol import Sample


@dataclass
class MicroBatch:
    """Padded tensors of one micro-batch (B sequences, L = longest prompt+completion,
    T = longest completion).

    Attributes:
        input_ids: int64 [B, L] prompt+completion, right-padded with pad_id.
        attention_mask: int64 [B, L].
        predict_pos: int64 [B, T] position whose logits predict completion token t
            (prompt_len - 1 + t; 0 on padding).
        targets: int64 [B, T] completion tokens (pad_id on padding).
        mask: float32 [B, T] 1 on completion tokens.
        behaviour_logprobs: float32 [B, T] (0 on padding).
        advantages: float32 [B].
        rewards: float32 [B].
        policy_versions: int64 [B].
        prompt_keys: the B samples' prompt ids (strings), e.g. to pair DPO samples.
        is_weights: float32 [B], each sample's importance weight from the queue (1 unless
            it samples proportionally); the surrogate and SFT losses multiply it in.
        packed: the shared-prefix layout (the samples' token trie as one sequence, no
            padding; learner/prefix.py), or None (one padded sequence per sample).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    predict_pos: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    behaviour_logprobs: torch.Tensor
    advantages: torch.Tensor
    rewards: torch.Tensor
    policy_versions: torch.Tensor
    prompt_keys: list[str]
    is_weights: torch.Tensor | None = None
    packed: Packed | None = None

    def __post_init__(self) -> None:
        if self.is_weights is None:
            self.is_weights = torch.ones(self.advantages.shape[0], dtype=torch.float32)

    def to(self, device: torch.device | str) -> MicroBatch:
        """This micro-batch with every tensor (the packed layout's too) on ``device``; the
        same object when they are already there."""
        device = torch.device(device)
        if self.input_ids.device == device:
            return self
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=True)
        if self.packed is not None:
            moved["packed"] = self.packed.to(device)
        return MicroBatch(**moved)

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) prompt+completion tokens of the samples, each counted in full."""
        return int(self.attention_mask.sum())

    @property
    def forward_tokens(self) -> int:
        """Tokens the forward actually computes, padding excluded: ``num_tokens`` for the
        per-sample forward; the trie's nodes (each shared prefix once, no completion's last
        token) for the shared-prefix one."""
        return self.num_tokens if self.packed is None else self.packed.length

    @property
    def padded_tokens(self) -> int:
        """Token slots the forward computes, padding included (packed: none)."""
        return self.input_ids.numel() if self.packed is None else self.packed.length


def collate(samples: list[Sample], pad_id: int, share_prefix: bool = False) -> MicroBatch:
    """Pad a list of samples into a :class:`MicroBatch`; with ``share_prefix``, also pack
    them as their token trie for the shared-prefix forward (learner/prefix.py).

    Raises:
        ValueError: empty list.
    """
    if not samples:
        raise ValueError("cannot collate an empty micro-batch")
    B = len(samples)
    L = max(s.num_tokens for s in samples)
    T = max(len(s.completion_ids) for s in samples)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    targets = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.float32)
    beh = torch.zeros((B, T), dtype=torch.float32)
    for b, s in enumerate(samples):
        P, C = len(s.prompt_ids), len(s.completion_ids)
        comp = torch.from_numpy(s.completion_ids.astype("int64"))
        input_ids[b, :P] = torch.from_numpy(s.prompt_ids.astype("int64"))
        input_ids[b, P : P + C] = comp
        attn[b, : P + C] = 1
        pos[b, :C] = torch.arange(P - 1, P - 1 + C)
        targets[b, :C] = comp
        mask[b, :C] = 1.0
        beh[b, :C] = torch.from_numpy(s.logprobs.astype("float32"))
    return MicroBatch(
        input_ids=input_ids,
        attention_mask=attn,
        predict_pos=pos,
        targets=targets,
        mask=mask,
        behaviour_logprobs=beh,
        advantages=torch.tensor([s.advantage for s in samples], dtype=torch.float32),
        rewards=torch.tensor([s.reward for s in samples], dtype=torch.float32),
        policy_versions=torch.tensor([s.policy_version for s in samples], dtype=torch.long),
        prompt_keys=[s.prompt_id for s in samples],
        is_weights=torch.tensor([s.is_weight for s in samples], dtype=torch.float32),
        packed=pack([s.prompt_ids for s in samples], [s.completion_ids for s in samples], T)
        if share_prefix
        else None,  # fmt: skip
    )


def completion_hidden(model, batch: MicroBatch) -> torch.Tensor:
    """The decoder's last hidden state at each position that predicts a completion token,
    [B, T, H] (the state s_t before completion token t is emitted); through the
    shared-prefix forward when the batch is packed."""
    if batch.packed is not None:
        return shared_prefix_hidden(model, batch.packed)
    hidden = model.get_decoder()(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask
    ).last_hidden_state  # [B, L, H]
    idx = batch.predict_pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return torch.gather(hidden, 1, idx)


def logprobs_from_hidden(
    model, h: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply the LM head to ``h`` [B, T, H] and return log pi(targets) [B, T] float32 (and the
    entropy [B, T] of the tempered distribution when asked)."""
    logits = model.get_output_embeddings()(h).float() / temperature  # [B, T, V]
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def compute_precision(dtype: torch.dtype, device_type: str = "cpu"):
    """The context a forward runs in: bf16 autocast (matmuls in bf16, weights and everything
    autocast keeps in fp32 stay fp32) for ``torch.bfloat16``, nothing for float32."""
    return torch.autocast(device_type, dtype=dtype, enabled=dtype == torch.bfloat16)


def token_logprobs(
    model, batch: MicroBatch, temperature: float, with_entropy: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """log pi_theta(target_t | prefix) under ``model`` at ``temperature``, [B, T] float32.

    Uses the decoder's hidden states and applies the output embedding only at the
    predicting positions. The logits are divided by the sampling temperature so the
    result is comparable with the actor's behaviour logprobs. ``dtype``: the compute
    dtype (:func:`compute_precision`); the log-softmax is always float32.

    Returns:
        (logprobs [B, T], entropy [B, T] of the tempered distribution or None).
    """
    with compute_precision(dtype, batch.input_ids.device.type):
        h = completion_hidden(model, batch)
        return logprobs_from_hidden(model, h, batch.targets, temperature, with_entropy)


class PolicyForward(torch.nn.Module):
    """The learner's forward pass as one module: hidden states at the completion positions,
    their token logprobs and (optionally) entropies.

    It exists so a DeepSpeed engine can run the forward itself (``engine(batch, ...)``):
    ZeRO-3 gathers parameters and counts micro-steps in the engine's forward, and a
    forward that bypassed it would silently drop all but the last micro-batch's gradient
    (measured). The torch backend calls the same module directly.

    Args:
        model: an HF causal LM (``get_decoder`` / ``get_output_embeddings``), fp32 weights.
        dtype: compute dtype (``torch.bfloat16``: mixed precision, see
            :func:`compute_precision`; the weights the optimizer steps stay fp32).
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(
        self, batch: MicroBatch, temperature: float, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Returns (hidden [B, T, H] float32, logprobs [B, T] float32, entropy [B, T] or None)."""
        with compute_precision(self.dtype, batch.input_ids.device.type):
            h = completion_hidden(self.model, batch)
            logp, entropy = logprobs_from_hidden(
                self.model, h, batch.targets, temperature, with_entropy
            )
        return h.float(), logp, entropy
