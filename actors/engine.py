"""Generation engines behind one small interface: sample G completions per prompt with logprobs.

The actor drives every engine through the same async methods: ``agenerate`` (sample),
``connect_weights`` (where the learner's weights come from), ``apply_weights`` (use the
newest weights received; returns the policy version) and ``weight_status``. vLLM
(actors/vllm_engine.py) is the default engine; :class:`HFEngine` (transformers
``generate``) is the fallback and :class:`FakeEngine` the load-test engine. Both local
engines hold their model in the actor process and run ``generate`` in a worker thread,
so their weights are swapped only between generate calls (``in_flight_updates`` False).

HFEngine's behaviour logprobs are taken from the processed scores that were actually
sampled from, and sampling uses temperature only (top-k 0, top-p 1), so they
equal the learner's ``log_softmax(logits / T)`` of the same weights up to float error.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from dashrl.protocol import Completion
from dashrl.protocol.model import load_causal_lm, load_tokenizer
from dashrl.protocol.receivers import open_receiver
from dashrl.protocol.weights import WeightSource


class GenerationEngine(Protocol):
    """What an actor needs from a generation engine (HF, fake, or vLLM)."""

    tokenizer: object
    in_flight_updates: bool
    """True: apply_weights may run while generate calls are in flight (vLLM)."""

    async def agenerate(
        self, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float
    ) -> list[list[Completion]]:
        """Sample ``n`` completions per prompt (temperature 0: greedy): [len(prompts)][n]
        Completions with tokens, behaviour logprobs and finish reason (the actor then sets
        reward, advantage and policy version on the same objects)."""
        ...

    async def connect_weights(self, source: WeightSource) -> None:
        """Receive the learner's weights from ``source`` from now on (version kept)."""
        ...

    async def apply_weights(self) -> int:
        """Start using the newest received weights, if any; returns the policy version."""
        ...

    async def weight_status(self) -> dict:
        """version, received, rejected, error (str or None) and stopped of the receiver."""
        ...


class LocalWeights:
    """The async engine interface for an engine whose model lives in this process: the
    receiver stages weights on a thread and ``apply_weights`` copies them into
    ``sync_parameters()`` (call it between generate calls)."""

    in_flight_updates = False
    receiver = None

    def sync_parameters(self) -> list[torch.Tensor]:
        """The engine's weight tensors in the learner's ``model.parameters()`` order."""
        return list(self.model.parameters())

    async def agenerate(
        self, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float
    ) -> list[list[Completion]]:
        return await asyncio.to_thread(self.generate, prompts, n, max_new_tokens, temperature)

    async def connect_weights(self, source: WeightSource) -> None:
        version = self.receiver.version if self.receiver is not None else None
        self.receiver = open_receiver(source, self.sync_parameters())
        if version is not None:  # switching sources keeps the weights it has
            self.receiver.version = version

    async def apply_weights(self) -> int:
        return self.receiver.apply()

    async def weight_status(self) -> dict:
        return self.receiver.status()


class HFEngine(LocalWeights):
    """transformers ``generate`` on the model's device (CPU unless ``device`` says).

    Args:
        model_path: HF model directory.
        seed: seed of the sampling RNG.
        model, tokenizer: an already loaded model and tokenizer to use instead of a path
            (it stays on its device, e.g. the learner's GPU).
        device: where a model loaded from ``model_path`` runs (default CPU).

    The model is shared with the weight receiver through :meth:`sync_parameters`:
    updates are copied in place between ``generate`` calls. Inputs go to the model's
    device and the outputs come back to the CPU.
    """

    def __init__(
        self,
        model_path: Path | None = None,
        seed: int = 0,
        model=None,
        tokenizer=None,
        device: str | torch.device | None = None,
    ):
        if model is None:  # else: share a model that is already loaded (the learner's)
            if model_path is None:
                raise ValueError("HFEngine needs a model_path or a loaded model")
            model, tokenizer = load_causal_lm(model_path, train=False), load_tokenizer(model_path)
            if device is not None:
                model = model.to(device)
        self.tokenizer = tokenizer
        self.model = model
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.eos_ids = self._eos_ids()
        self.generator_seed = seed
        torch.manual_seed(seed)

    def _eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        ids = [i for i in ids if i is not None] + [self.tokenizer.eos_token_id]
        return sorted(set(int(i) for i in ids))

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float
    ) -> list[list[Completion]]:
        from transformers import GenerationConfig

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: generation continues at the right edge
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        sampling = temperature > 0  # temperature 0: greedy decoding
        gen_cfg = GenerationConfig(
            do_sample=sampling,
            temperature=temperature if sampling else 1.0,
            top_k=0 if sampling else None,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=n,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
        was_training = self.model.training  # a shared learner model stays in train mode
        self.model.eval()
        device = self.model.device
        try:
            out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                      generation_config=gen_cfg)  # fmt: skip
        finally:
            self.model.train(was_training)
        new = out.sequences[:, width:].cpu()  # [B*n, steps]
        # scores[t]: [B*n, V] processed logits (temperature applied) that step t sampled from.
        logprobs = torch.stack(
            [
                torch.log_softmax(s.float().cpu(), dim=-1).gather(1, new[:, t : t + 1]).squeeze(1)
                for t, s in enumerate(out.scores)
            ],
            dim=1,
        )
        is_eos = torch.isin(new, torch.tensor(self.eos_ids))
        results: list[list[Completion]] = []
        for i in range(len(prompts)):
            group = []
            for j in range(n):
                row = i * n + j
                eos_at = torch.nonzero(is_eos[row])
                end = int(eos_at[0]) + 1 if len(eos_at) else new.shape[1]
                group.append(
                    Completion(
                        token_ids=new[row, :end].numpy().astype(np.int32),
                        logprobs=logprobs[row, :end].numpy().astype(np.float32),
                        finish_reason="stop" if len(eos_at) else "length",
                    )
                )
            results.append(group)
        return results


class FakeEngine(LocalWeights):
    """Random completions as fast as the CPU allows, for load tests of the queue and learner.

    It holds the real model's parameters (so weight updates arrive and apply exactly as in
    a real actor) and its tokenizer (so verifiers run on real text), but never runs the
    model: each completion is 1..max_new_tokens random token ids with random behaviour
    logprobs in [-3, -0.01).

    Args:
        model_path: HF model directory (tokenizer and parameters).
        seed: seed of the random generator.
    """

    def __init__(self, model_path: Path, seed: int = 0):

        self.tokenizer = load_tokenizer(model_path)
        self.model = load_causal_lm(model_path)
        self.vocab = int(self.model.get_input_embeddings().num_embeddings)
        self.rng = np.random.default_rng(seed)

    def generate(
        self, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float
    ) -> list[list[Completion]]:
        out = []
        for _ in prompts:
            group = []
            for _ in range(n):
                length = int(self.rng.integers(1, max_new_tokens + 1))
                ids = self.rng.integers(0, self.vocab, length).astype(np.int32)
                logp = self.rng.uniform(-3.0, -0.01, length).astype(np.float32)
                group.append(
                    Completion(
                        ids, logp, finish_reason="length" if length == max_new_tokens else "stop"
                    )
                )
            out.append(group)
        return out
