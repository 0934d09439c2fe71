"""Collation, the learner's logprobs, and their agreement with the actor's behaviour logprobs."""

from __future__ import annotations

import numpy as np
import torch

from dashrl.actors.engine import HFEngine
from dashrl.learner.batch import collate, token_logprobs
from dashrl.protocol import Sample


def sample(prompt: list[int], completion: list[int], lp: list[float] | None = None) -> Sample:
    c = np.array(completion, np.int32)
    return Sample.make(
        "p",
        np.array(prompt, np.int32),
        c,
        np.array(lp if lp else [-1.0] * len(c), np.float32),
        1.0,
        0.5,
        3,
    )


def test_collate_pads_and_indexes_prediction_positions() -> None:
    b = collate([sample([5, 6, 7], [8, 9]), sample([1], [2, 3, 4])], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert b.predict_pos.tolist() == [[2, 3, 0], [0, 1, 2]]
    assert b.targets.tolist() == [[8, 9, 0], [2, 3, 4]]
    assert b.mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert b.num_tokens == 9 and b.policy_versions.tolist() == [3, 3]


def test_token_logprobs_match_a_plain_forward(tiny_model_path) -> None:
    from dashrl.protocol.model import load_causal_lm

    model = load_causal_lm(tiny_model_path)
    samples = [sample([5, 6, 7, 11], [8, 9]), sample([1], [2, 3, 4, 10])]
    got, ent = token_logprobs(model, collate(samples, pad_id=0), temperature=0.7, with_entropy=True)
    with torch.no_grad():
        for b, s in enumerate(samples):
            ids = torch.tensor(np.concatenate([s.prompt_ids, s.completion_ids]))[None].long()
            logits = model(input_ids=ids).logits[0].float() / 0.7
            lp = torch.log_softmax(logits, -1)
            P, C = len(s.prompt_ids), len(s.completion_ids)
            want = lp[P - 1 : P - 1 + C].gather(1, ids[0, P:, None]).squeeze(1)
            torch.testing.assert_close(got[b, :C], want, atol=1e-5, rtol=1e-5)
            want_ent = -(lp.exp() * lp).sum(-1)[P - 1 : P - 1 + C]
            torch.testing.assert_close(ent[b, :C], want_ent, atol=1e-4, rtol=1e-4)


def test_behaviour_logprobs_agree_with_learner(tiny_model_path) -> None:
    engine = HFEngine(tiny_model_path, seed=3)
    prompts = [[1, 50, 60, 70], [2, 80]]
    gens = engine.generate(prompts, n=3, max_new_tokens=6, temperature=0.7)
    assert [len(g) for g in gens] == [3, 3]
    samples = [
        sample(p, g.token_ids.tolist(), g.logprobs.tolist())
        for p, group in zip(prompts, gens, strict=True)
        for g in group
    ]
    for g in (g for group in gens for g in group):
        assert g.finish_reason in ("stop", "length") and len(g.token_ids) == len(g.logprobs)
        assert (len(g.token_ids) == 6) == (g.finish_reason == "length")
    batch = collate(samples, pad_id=engine.pad_id)
    with torch.no_grad():
        lp, _ = token_logprobs(engine.model, batch, temperature=0.7)
    diff = ((lp - batch.behaviour_logprobs).abs() * batch.mask).max()
    assert float(diff) < 1e-4
