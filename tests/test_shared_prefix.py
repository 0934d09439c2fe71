"""The shared-prefix forward (learner/prefix.py) against the padded per-sample forward: the
same loss and the same gradient of every parameter, for the surrogate, PPO's critic with
the ORM head, and DPO pairs, with prompts that share a system prefix and completions that
share their opening; plus whole-group units in the queue and the dtype choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dashrl.learner.batch import collate
from dashrl.learner.learner import Learner
from dashrl.learner.prefix import pack
from dashrl.protocol import Sample
from dashrl.protocol.hardware import native_bf16, resolve_dtype
from dashrl.queue.buffer import ReplayBuffer
from dashrl.queue.policies import group_units, unit_grouping


def _sample(rng, prompt: list[int], n: int, adv: float, reward: float, pid: str) -> Sample:
    c = rng.integers(5, 400, n).astype(np.int32)
    lp = (-rng.random(n) * 3).astype(np.float32)
    return Sample.make(pid, np.array(prompt, np.int32), c, lp, reward, adv, 0)


def _groups(seed: int = 0) -> list[Sample]:
    """Two prompts of different lengths; completions of 1 to 9 tokens; the groups'
    samples interleaved (the forward must put every row back in place)."""
    rng = np.random.default_rng(seed)
    a, b = [1, 50, 60, 70, 80], [2, 9, 8, 7, 6, 5, 4, 3, 11]
    g1 = [
        _sample(rng, a, n, x, r, "a") for n, x, r in ((3, 1.2, 1.0), (7, -0.4, 0.0), (1, -0.4, 0.0))
    ]
    g2 = [
        _sample(rng, b, n, x, r, "b") for n, x, r in ((9, 0.9, 1.0), (2, -0.9, 0.0), (5, 0.9, 1.0))
    ]
    return [g1[0], g2[0], g1[1], g2[1], g1[2], g2[2]]


def _shared_system(seed: int = 0) -> list[Sample]:
    """Per-sample units as the default queue serves them: three prompts that share a
    4-token head (a system turn) and differ after it, one of them twice with completions
    that share their first two tokens, one completion identical to another."""
    rng = np.random.default_rng(seed)
    head = [1, 50, 60, 70]
    a, b, c = [*head, 8, 9], [*head, 3], [*head, 8, 4, 4]
    s = [_sample(rng, p, n, x, r, k) for p, n, x, r, k in (
        (a, 5, 1.5, 1.0, "a"), (b, 4, -0.6, 0.0, "b"), (c, 1, 0.8, 1.0, "c"),
        (a, 6, -0.5, 0.0, "a"), (b, 4, 2.0, 1.0, "b"))]  # fmt: skip
    s[3].completion_ids[:2] = s[0].completion_ids[:2]  # same opening, then apart
    s[4].completion_ids[:] = s[1].completion_ids  # the same completion twice
    s[4].logprobs[:] = s[1].logprobs
    return s


def _dpo_pairs() -> list[Sample]:
    """(chosen, rejected) pairs that share their prompt, as the queue serves them."""
    a, b, rng = [1, 50, 60, 70], [2, 9, 8, 7, 6, 5], np.random.default_rng(1)
    return [_sample(rng, a, 4, 1.0, 1.0, "a"), _sample(rng, a, 6, -1.0, 0.0, "a"),
            _sample(rng, b, 3, 1.0, 1.0, "b"), _sample(rng, b, 1, -1.0, 0.0, "b")]  # fmt: skip


def _loss_and_grads(learner: Learner, samples: list[Sample], share: bool):
    learner.cfg.learner.share_prefix = share
    m = learner.train_micro_batch(samples, 1.0)
    params = [*learner.model.parameters(), *(p for h in learner.heads.values()
                                             for p in h.parameters())]  # fmt: skip
    grads = [p.grad.detach().clone() if p.grad is not None else None for p in params]
    learner.zero_grad()
    return m, grads


def _compare(learner: Learner, samples: list[Sample], atol: float) -> float:
    """Max abs difference of the gradients; asserts the loss and every gradient agree."""
    m0, g0 = _loss_and_grads(learner, samples, share=False)
    m1, g1 = _loss_and_grads(learner, samples, share=True)
    assert m1["learner/forward_tokens"] < m0["learner/forward_tokens"]  # prompts once
    assert m1["learner/tokens"] == m0["learner/tokens"]  # the same samples trained on
    assert abs(m1["learner/loss"] - m0["learner/loss"]) <= atol
    worst, nonzero = 0.0, 0
    for a, b in zip(g0, g1, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            worst = max(worst, float((a - b).abs().max()))
            nonzero += int(a.abs().max() > 0)
    assert nonzero > 10  # the gradients are real, not all zero
    assert worst <= atol, worst
    return worst


def test_collate_packs_each_shared_token_once() -> None:
    batch = collate(_groups(), pad_id=0, share_prefix=True)
    # prompts 5 and 9 tokens once; completions 3+7+1 and 9+2+5, all but their last token
    assert batch.forward_tokens == 5 + 9 + (11 - 3) + (16 - 3)
    assert batch.num_tokens == 3 * 5 + 3 * 9 + 27
    assert collate(_groups(), pad_id=0).packed is None
    # the 4-token head once, then [8, 9] and [8, 4, 4] under one 8, and [3]; the
    # completions 4+5 (a's two share 2 tokens), 3 (b's two are one path) and 0 (c's one token)
    shared = collate(_shared_system(), pad_id=0, share_prefix=True)
    assert shared.forward_tokens == 4 + (2 + 2 + 1) + (4 + 5 - 2) + 3 + 0
    assert shared.num_tokens == 2 * 6 + 2 * 5 + 7 + (5 + 4 + 1 + 6 + 4)


def test_packed_layout_by_hand() -> None:
    """Prompt [1, 2] with completions [5, 6, 7] and [8], then prompt [3] with [9, 4]: each
    completion but its last token follows its prompt, positions continue the prompt's,
    and token t is predicted by the state before it."""
    from dashrl.learner.prefix import pack

    a, b = np.array([1, 2]), np.array([3])
    comps = [np.array([5, 6, 7]), np.array([8]), np.array([9, 4])]
    p = pack([a, a, b], comps, T=3)
    assert p.input_ids.tolist() == [[1, 2, 5, 6, 3, 9]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 0, 1]]
    assert p.end.tolist() == [4, 4, 4, 4, 6, 6]
    assert p.predict.tolist() == [[1, 2, 3], [1, 0, 0], [4, 5, 0]]
    m = p.attention_mask("sdpa")[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                 [1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 1, 1]]  # fmt: skip
    eager = p.attention_mask("eager")[0, 0]
    assert (eager == 0).int().tolist() == m and eager.min() < -1e30
    with pytest.raises(ValueError, match="flash"):
        p.attention_mask("flash_attention_2")


def test_trie_layout_by_hand() -> None:
    """Prompts [1, 2, 3] and [1, 2, 4] share [1, 2]; completions [5, 6, 7] and [5, 8] of the
    first share their 5. Pre-order: 1 2 3 5 6 8 4 (7 and the second completion's last token
    predict nothing); the shared nodes come once and every branch continues the positions."""
    comps = [np.array([5, 6, 7]), np.array([5, 8, 9]), np.array([6])]
    p = pack([np.array([1, 2, 3]), np.array([1, 2, 3]), np.array([1, 2, 4])], comps, T=3)
    assert p.input_ids.tolist() == [[1, 2, 3, 5, 6, 8, 4]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 4, 2]]
    assert p.end.tolist() == [7, 7, 6, 6, 5, 6, 7]
    assert p.predict.tolist() == [[2, 3, 4], [2, 3, 5], [6, 0, 0]]
    m = p.attention_mask("sdpa")[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0],
                 [1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 1, 0],
                 [1, 1, 0, 0, 0, 0, 1]]  # fmt: skip


def test_eager_attention_gives_the_same_states(tiny_model_path) -> None:
    from dashrl.learner.batch import completion_hidden
    from dashrl.protocol.model import load_causal_lm

    model = load_causal_lm(tiny_model_path)
    model.config._attn_implementation = "eager"
    for samples in (_groups(), _shared_system()):
        per_sample, shared = collate(samples, 0), collate(samples, 0, share_prefix=True)
        with torch.no_grad():
            h0, h1 = completion_hidden(model, per_sample), completion_hidden(model, shared)
        assert float(((h0 - h1).abs() * per_sample.mask[..., None]).max()) <= 1e-5


@pytest.mark.parametrize("batch", [_groups, _shared_system])
@pytest.mark.parametrize(("algo", "dense"), [("grpo", "none"), ("ppo", "orm")])
def test_shared_prefix_equals_per_sample_forward_float32(tiny_cfg, algo: str, dense: str,
                                                         batch) -> None:  # fmt: skip
    cfg = tiny_cfg.model_copy(update={"algo": algo}, deep=True)
    cfg.learner.backend, cfg.learner.dtype, cfg.reward.dense = "torch", "float32", dense
    _compare(Learner(cfg, connect=False), batch(), atol=1e-5)


def test_shared_prefix_equals_per_sample_forward_for_dpo_pairs(tiny_cfg) -> None:
    cfg = tiny_cfg.model_copy(update={"algo": "iterative_dpo"}, deep=True)
    cfg.learner.backend, cfg.learner.dtype = "torch", "float32"
    _compare(Learner(cfg, connect=False), _dpo_pairs(), atol=1e-5)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_shared_prefix_under_deepspeed(tiny_cfg, stage: int) -> None:
    pytest.importorskip("deepspeed")
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.learner.backend, cfg.learner.zero_stage, cfg.learner.dtype = "deepspeed", stage, "float32"
    learner = Learner(cfg, connect=False)
    ref_cfg = cfg.model_copy(deep=True)
    ref_cfg.learner.backend, ref_cfg.learner.share_prefix = "torch", False
    ref = Learner(ref_cfg, connect=False)
    samples = _groups()
    m = learner.train_micro_batch(samples, 1.0)
    want = ref.train_micro_batch(samples, 1.0)
    assert abs(m["learner/loss"] - want["learner/loss"]) <= 1e-5
    assert learner.optimizer_step()[1] and ref.optimizer_step()[1]
    got, exp = learner.backend.full_state_dict(), ref.backend.full_state_dict()
    for k in exp:  # one step from the same gradients: the same weights
        torch.testing.assert_close(got[k], exp[k], rtol=1e-5, atol=1e-6, msg=k)


def _rel_err(got: list, want: list) -> float:
    """||got - want|| / ||want|| over every parameter's gradient at once."""
    num = sum(float(((a - b) ** 2).sum()) for a, b in zip(got, want, strict=True) if b is not None)
    den = sum(float((b**2).sum()) for b in want if b is not None)
    return (num / den) ** 0.5


def test_shared_prefix_on_smollm2_float32_and_bf16(tmp_path) -> None:
    """The real model: float32 within 1e-5. In bf16 autocast both paths carry bf16's own
    rounding, and the shared one must be as close to the exact (float32) gradient as the
    per-sample one: relative norm errors over 3 micro-batches, measured here 0.04-0.29
    per-sample and 0.06-0.21 shared (the gradients of 6 samples with advantages of both
    signs cancel, which magnifies rounding), means 0.136 and 0.120."""
    from dashrl.protocol.config import Config
    from dashrl.protocol.model import resolve_model

    cfg = Config.model_validate({"run_dir": str(tmp_path), "eval": {"heldout": False},
                                 "learner": {"backend": "torch", "dtype": "float32"}})  # fmt: skip
    cfg.model.path = resolve_model(cfg.model.name, cfg.model.cache_dir)
    learner = Learner(cfg, connect=False)
    _compare(learner, _groups(), atol=1e-5)
    _compare(learner, _shared_system(), atol=1e-5)
    per_sample, shared = [], []
    for seed in range(3):
        samples = _groups(seed)
        learner.dtype = learner.backend.module.dtype = torch.float32
        _, exact = _loss_and_grads(learner, samples, share=False)
        learner.dtype = learner.backend.module.dtype = torch.bfloat16
        m0, g0 = _loss_and_grads(learner, samples, share=False)
        m1, g1 = _loss_and_grads(learner, samples, share=True)
        assert abs(m1["learner/loss"] - m0["learner/loss"]) <= 1e-3  # measured up to 1.8e-4
        per_sample.append(_rel_err(g0, exact))
        shared.append(_rel_err(g1, exact))
    assert 0 < np.mean(per_sample) < 0.5  # bf16 really ran, and stays near float32
    assert np.mean(shared) <= 1.5 * np.mean(per_sample)


def test_group_units_filter_each_sample_and_cut_to_the_micro_batch() -> None:
    assert group_units([1.0, 0.0, -0.5, 0.0, 2.0], 0.0) == [(0, 2, 4)]
    assert group_units([1.0, 1.0, 1.0, 1.0, 1.0], 0.0, max_size=2) == [(0, 1), (2, 3), (4,)]
    assert group_units([0.0, 0.0], 0.0) == []
    assert group_units([0.0, 0.5], None) == [(0, 1)]
    assert unit_grouping("pair", True, 0.0, 8)([1.0, -1.0]) == [(0, 1)]  # DPO keeps pairs
    assert unit_grouping("sample", False, 0.0, 8)([1.0, -1.0]) == [(0,), (1,)]


def test_buffer_serves_whole_groups_ranked_by_their_largest_advantage() -> None:
    """A 1-of-4 group (|A| 1.5 and 0.5) outranks a 2-of-4 group (|A| 1.0); each is served
    whole, so a micro-batch holds one prompt."""
    buf, rng = ReplayBuffer(64, 0.0, 4), np.random.default_rng(2)
    even = [_sample(rng, [1, 2], 3, a, 0.0, "even") for a in (1.0, -1.0, 1.0, -1.0)]
    rare = [_sample(rng, [3, 4], 3, a, 0.0, "rare") for a in (1.5, -0.5, -0.5, -0.5)]
    for g in (even, rare):
        buf.add(g, group_units([s.advantage for s in g], 0.0, max_size=4))
    first = buf.pop_micro_batch(4)
    assert {s.prompt_id for s in first} == {"rare"} and len(first) == 4
    assert {s.prompt_id for s in buf.pop_micro_batch(4)} == {"even"}


def test_tis_auto_is_on_where_an_engine_computes_in_bf16(tiny_cfg) -> None:
    from dashrl.learner.objectives import AUTO_TIS_CAP, auto_tis_cap

    f32, bf16 = torch.float32, torch.bfloat16
    assert auto_tis_cap(None, f32, f32) == 0.0
    assert auto_tis_cap(None, bf16, f32) == auto_tis_cap(None, f32, bf16) == AUTO_TIS_CAP
    assert auto_tis_cap(0.0, bf16, bf16) == 0.0 and auto_tis_cap(3.0, f32, f32) == 3.0
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.learner.dtype = "bfloat16"
    assert Learner(cfg, connect=False).context.tis_cap == 0.0  # the default: off
    cfg.learner.tis_cap, cfg.learner.dtype = None, "float32"  # auto, HF (float32) actor: off
    assert Learner(cfg, connect=False).context.tis_cap == 0.0
    cfg.learner.dtype = "bfloat16"
    assert Learner(cfg, connect=False).context.tis_cap == AUTO_TIS_CAP


def test_dtype_auto_follows_the_matrix_units() -> None:
    assert native_bf16("cpu", {"avx512f", "amx_bf16", "avx512_bf16"}) == "amx_bf16"
    assert native_bf16("cpu", {"avx512f", "avx512_bf16"}) == "avx512_bf16"
    assert native_bf16("cpu", {"avx2"}) is None
    assert resolve_dtype("auto", "cpu", "learner", {"avx512_bf16"}) == torch.bfloat16
    assert resolve_dtype("auto", "cpu", "learner", {"avx2"}) == torch.float32
    assert resolve_dtype("float32", "cpu", "learner", {"amx_bf16"}) == torch.float32
    assert resolve_dtype("bfloat16", "cpu", "learner", set()) == torch.bfloat16
    assert resolve_dtype("float16", "cpu", "actor") == torch.float16
    with pytest.raises(ValueError, match="int8"):
        resolve_dtype("int8", "cpu", "learner")
