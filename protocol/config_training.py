"""The config tree's sections for training and transport: queue, learner, PPO and the
sockets/weight channel (protocol/config.py assembles the tree). Imports nothing heavy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from dashrl.protocol.config_sections import Strict


class QueueConfig(Strict):
    capacity: int = Field(2048, ge=1)
    """Most samples held; beyond it the lowest-|A| samples are evicted first."""
    filter_threshold: float | None = Field(0.0, ge=0)
    """DASH gradient filtering: samples with |A| <= threshold are dropped on arrival
    (0 drops exactly the zero-advantage samples; None turns filtering off, the DASH ablation)."""
    max_staleness: int = Field(4, ge=0)
    """Samples whose version lag (learner version - policy version) exceeds this are evicted."""
    length_window: int = Field(2, ge=1)
    """Length-aware micro-batching: a micro-batch (by sequences) is the top-priority sample
    plus the closest-length samples among the top length_window * micro_batch_size
    (queue/buffer.py length_aware_pick); cuts padding (bench/learner_tokens.py). 1: strict
    priority order."""
    max_frame_bytes: int = Field(64 * 1024 * 1024, ge=4096, le=1 << 31)
    """Largest frame the queue decodes, in bytes; larger frames are rejected and counted."""
    max_seq_len: int = Field(8192, ge=1, le=1 << 20)
    """Longest prompt or completion accepted, in tokens."""
    max_group_size: int = Field(1024, ge=1, le=65536)
    """Most completions in one group."""
    max_abs_reward: float = Field(100.0, gt=0, le=1e9)
    """A group holding a reward with |r| above this is refused (counted in
    queue/rejected_values): verifier rewards are O(1), and one huge value would set the
    direction of a whole update."""
    max_abs_advantage: float = Field(100.0, gt=0, le=1e9)
    """A group holding an advantage with |A| above this is refused (counted in
    queue/rejected_values). GRPO's largest is sqrt(G - 1) (one success among G)."""
    max_version_jump: int = Field(1, ge=1)
    """Most a micro-batch request's learner_version may exceed the last one the queue saw
    (the learner's version grows by one per step and it asks at least once per step); a
    request beyond it is refused and counted, so a stray client cannot make the queue
    evict everything as stale. The first request after the queue starts may carry any."""
    log_rollouts: bool = True
    """Append every accepted rollout group to <run_dir>/queue/rollouts.msgpack for replay."""
    max_uses: int = Field(1, ge=1, le=64)
    """Replay: serve each unit up to K times (PPO-style off-policy reuse, DASH finding ii);
    a reuse comes at a later learner version than the last serve, and max_staleness still
    applies. 1: each sample is trained on once."""
    sampling: Literal["greedy", "proportional"] = "greedy"
    """greedy: top priority first, within the length window. proportional: units drawn with
    P(i) ~ p_i^priority_exponent (prioritized experience replay) and importance-weighted."""
    priority_exponent: float = Field(1.0, ge=0, le=10)
    """alpha of proportional sampling (0: uniform)."""
    is_beta: float = Field(0.4, ge=0, le=1)
    """beta of proportional sampling's importance weights (N P(i))^-beta / max, multiplied
    into each sample's loss (1: full bias correction; 0.4 is PER's starting value)."""
    samples_per_insert: float | None = Field(None, gt=0, le=64)
    """Rate limiter (Reverb's SampleToInsertRatio): serves per accepted sample it paces
    generation to; when the queue is that far ahead it stops reading rollouts and the
    actors' sends block. None: off. With it on, the sockets' buffers shrink to about one
    batch so that blocking reaches the actors soon."""
    rate_error_buffer: float | None = Field(None, gt=0)
    """Allowed deviation of the rate limiter, in serves. None: one learner step's samples
    (micro_batch_size * micro_batches_per_step by sequences, 64 by tokens): on the default
    job a batch arrives about two versions after it was started, so a held sample has two
    or three steps before it goes stale; with two steps of slack 7-12% of the accepted
    samples still did, with one step 1.6% (bench/replay_pacing.md)."""
    min_size: int = Field(0, ge=0)
    """Samples held before any micro-batch is served (Reverb's MinSize)."""
    expiring_first: bool | None = None
    """Greedy micro-batches by sequences serve the units on their last servable version (lag
    == max_staleness) before higher-|A| fresher ones (earliest deadline first), so a paced
    queue trains on what it accepted instead of evicting its low-|A| bottom as stale
    (queue/policies.py expiring_first_pick). None: on exactly when the rate limiter is
    (without one the queue is large and every micro-batch would be its oldest samples)."""
    serve_groups: bool = False
    """Store and serve each group's filtered samples as one unit (cut to micro_batch_size
    sequences), ranked by its largest |A|, so that a micro-batch's completions share their
    prompt and the learner forwards it once (learner.share_prefix). Off by default: on the
    default job (seed 0) ranking single samples by |A| learned far better (held-out 0.914
    after 60 steps, against 0.646 for whole groups; 0.789 with TIS), at 9.4 s per step
    against 8.3. DPO always serves (chosen, rejected) pairs."""
    priority_updates: bool = True
    """With max_uses > 1: the learner sends each served sample's new priority (|A| times
    its share of tokens the clip still lets through), and units at or below the filter
    threshold leave the queue."""


class LearnerConfig(Strict):
    steps: int = Field(60, ge=1)
    """Optimizer steps (each one bumps the policy version and broadcasts weights)."""
    lr: float = Field(2e-5, gt=0, le=1)
    """AdamW learning rate."""
    weight_decay: float = Field(0.0, ge=0, le=1)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas."""
    micro_batch_size: int = Field(8, ge=1)
    """Micro-batch size in micro_batch_unit (sequences or tokens)."""
    micro_batch_unit: Literal["sequences", "tokens"] = "sequences"
    """Whether micro_batch_size counts sequences or prompt+completion tokens."""
    micro_batches_per_step: int = Field(2, ge=1)
    """Gradient accumulation: micro-batches per optimizer step (DASH preemptive sampling)."""
    clip_eps_low: float = Field(0.2, ge=0, lt=1)
    """PPO clip epsilon below 1 for a fresh (lag 0) sample."""
    clip_eps_high: float = Field(0.28, ge=0, le=10)
    """PPO clip epsilon above 1 for a fresh sample (DAPO clip-higher)."""
    staleness_clip_decay: float = Field(0.5, ge=0, le=100)
    """Staleness-aware clipping: eps(lag) = eps / (1 + decay * lag). 0 disables it."""
    tis_cap: float | None = Field(0.0, ge=0)
    """Truncated importance sampling cap C (0: off). On: the surrogate becomes AReaL's
    decoupled PPO with the learner's own detached logprobs as the proximal policy and the
    weight min(pi_prox / mu, C) correcting the engine/learner mismatch (papers.md). None
    (auto): 2.0 when the learner or the vLLM actor computes in bf16/fp16, 0 when both run
    float32. With bf16 the lag-0 token ratio pi / mu has a standard deviation of 0.05-0.07,
    as wide as the staleness-tightened clip range: with whole-group serving TIS at 2 took
    the default job's held-out reward from 0.646 to 0.789, but the default per-sample
    serving reached 0.914 without it (seed 0), so it stays off by default."""
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_sum_const"] | None = None
    """How the loss averages tokens: token_mean (DAPO), seq_mean_token_mean (GRPO),
    seq_sum_const (Dr.GRPO, divided by actor.max_new_tokens). None: the algorithm's
    default (protocol/algorithms.py: seq_sum_const for dr_grpo, token_mean otherwise)."""
    kl_coef: float = Field(0.0, ge=0, le=100)
    """KL penalty to the reference model (k3 estimator); 0 = off (DASH finds it hurts)."""
    ref_update_every: int = Field(0, ge=0)
    """Copy the policy into the reference model (KL and DPO) every N steps; 0 keeps the
    initial model as the reference."""
    dpo_beta: float = Field(0.1, gt=0)
    """iterative_dpo: inverse temperature beta of DPO's implicit reward."""
    max_grad_norm: float = Field(1.0, gt=0, le=1e6)
    """Gradient clipping by global norm."""
    backend: Literal["auto", "deepspeed", "torch"] = "auto"
    """How the policy is stepped: DeepSpeed (deepspeed.initialize, ZeRO) or plain torch, with
    the same AdamW update (learner/backend.py). auto: DeepSpeed when it imports."""
    zero_stage: int = Field(0, ge=0, le=3)
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states sharded), 2 (+
    gradients), 3 (+ parameters; gathered one at a time for the weight broadcast)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype of the policy's forward/backward. bfloat16 is mixed precision as peers
    run it: bf16 matmuls under autocast, fp32 master weights, AdamW state, loss and
    logprob arithmetic (both backends). auto: bfloat16 where the device has native bf16
    matrix units (CUDA sm_80+, a CPU with AMX-BF16 or AVX512-BF16; detected and logged at
    start, protocol/hardware.py), else float32."""
    share_prefix: bool = True
    """Pack each micro-batch as the token trie of its samples, so every prefix they share
    (the prompts' common template, a group's prompt, completions' common openings) is
    forwarded once and attended to by all that continue it (learner/prefix.py): the same
    loss and gradients, fewer tokens, no padding. Pays off most when the queue serves whole
    groups (queue.serve_groups), and with per-sample units through the shared template."""
    num_ranks: int = Field(1, ge=1)
    """Learner processes (data parallel through DeepSpeed; started with torchrun). Only rank 0
    talks to the queue and the actors; each micro-batch is split across ranks."""
    torch_threads: int = Field(1, ge=1)
    """Torch/OpenMP threads of the learner process."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the learner trains: auto is cuda:LOCAL_RANK where torch sees a GPU, else the
    CPU (protocol/placement.py). The policy, reference model and heads are placed there
    before their optimizers are built; every micro-batch is moved there."""
    gpus: list[int] | None = None
    """GPUs of the learner (its CUDA_VISIBLE_DEVICES; rank r uses the r-th). None: inherit
    the launcher's environment (on a one-GPU machine every role then shares cuda:0)."""
    cpus: list[int] | None = None
    """CPU cores the learner's processes run on (sched_setaffinity). None: chosen by
    own_cores."""
    own_cores: bool = True
    """In async mode, on a machine without a GPU and with more cores than the learner's
    threads, give the learner cores of its own (the first torch_threads x num_ranks) and
    every other process the rest, wherever learner.cpus / actor.cpus are unset (sync and
    dash modes take turns, so each role keeps every core while it runs). The learner is the
    bottleneck on a small CPU, and an unpinned vLLM actor takes more than its one thread:
    its engine-core process spins on the worker's shared-memory queue while the worker
    computes (measured on 2 cores: the learner got about a third of a core). Resolved by
    the launcher into config.json and logged (protocol/placement.py resolve_cpus)."""
    checkpoint_every: int = Field(0, ge=0)
    """Save an HF checkpoint every N steps (0: only at the end)."""
    checkpoint_every_s: float = Field(0.0, ge=0)
    """Also save one whenever this many seconds of training passed since the last (0: off;
    the experiment runner's clock, launch/sweep.py). learner/checkpoint_s reports the
    seconds each save took."""
    checkpoint_optimizer: bool = True
    """Periodic checkpoints also hold the optimizer state and RNG, so --resume can continue
    from them. False: weights, tokenizer and version only (a checkpoint to evaluate, as
    TRL's save_only_model: a third of the bytes); --resume skips those. The final
    checkpoint is always complete."""
    queue_timeout_s: float = Field(10.0, gt=0)
    """How long the learner waits for the queue's answer before asking again, in seconds
    (a restarted queue answers the next request)."""
    queue_poll_s: float = Field(0.2, gt=0, le=60)
    """How long to wait before asking an empty queue again, in seconds."""
    weight_sync_timeout_s: float = Field(3600.0, gt=0, le=86400)
    """Timeout of one weight broadcast (torch.distributed), in seconds."""


class PPOConfig(Strict):
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount of the token-level MDP (1: undiscounted, as usual for LM RL)."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda (Schulman et al. 2016)."""
    vf_coef: float = Field(0.5, ge=0)
    """Weight of the critic's value loss in the total loss."""
    head_lr: float = Field(1e-3, gt=0)
    """AdamW learning rate of the value head and the ORM head (new, small modules that must
    track a moving policy: far larger than the policy's lr)."""
    head_hidden: int = Field(256, ge=0)
    """Hidden width of the value head and the ORM head (0: a linear head)."""
    detach_critic: bool = True
    """The critic and ORM heads read detached hidden states, so their losses do not move the
    policy's weights (see learner/critic.py for why)."""


class TransportConfig(Strict):
    host: str = "127.0.0.1"
    """Address the ZeroMQ sockets bind to. Anything but loopback needs curve_dir."""
    curve_dir: Path | None = None
    """CurveZMQ keys folder from ``start.py keys DIR``: every socket then authenticates
    with it and refuses clients without the authorised key (protocol/security.py)."""
    rollout_port: int = Field(0, ge=0, le=65535)
    """Queue PULL port for rollouts (0: pick a free port)."""
    request_port: int = Field(0, ge=0, le=65535)
    """Queue ROUTER port for micro-batch requests (0: pick a free port)."""
    dist_port: int = Field(0, ge=0, le=65535)
    """torch.distributed rendezvous port for the weight broadcast (0: pick a free port)."""
    learner_port: int = Field(0, ge=0, le=65535)
    """Rendezvous port of the learner's own ranks (torchrun; 0: pick a free port)."""
    control_port: int = Field(0, ge=0, le=65535)
    """The learner's control socket, where attached generator nodes register and send
    heartbeats (``start.py attach --connect HOST:PORT``; 0: pick a free port)."""
    weights_port: int = Field(0, ge=0, le=65535)
    """ZeroMQ PUB port on which the learner publishes each new version to attached nodes."""
    heartbeat_s: float = Field(1.0, gt=0)
    """Seconds between an attached node's heartbeats."""
    max_nodes: int = Field(64, ge=1, le=4096)
    """Most generator nodes attached at once; the control socket refuses registers beyond."""
    node_timeout_s: float = Field(6.0, gt=0)
    """An attached node silent for this long is dropped from the weight broadcast."""
    max_connections: int = Field(256, ge=1, le=65536)
    """Most open TCP connections per queue socket (idle ones included); the handshake of one
    more is refused and counted (queue/refused_connections), so idle connections cannot
    use up the queue's file descriptors."""
    handshake_s: float = Field(10.0, gt=0, le=3600)
    """Seconds a new connection has to complete the ZeroMQ handshake before it is closed
    (ZMQ_HANDSHAKE_IVL), so a connection that sends nothing cannot hold a slot."""
    max_pending_requests: int = Field(2, ge=1, le=1024)
    """Micro-batch requests the queue holds per peer; older ones beyond it are dropped and
    counted (queue/dropped_requests). The learner waits for each reply, so it has one;
    waiting requests are answered one per peer in turn, so no peer can crowd out another."""
    weight_backend: Literal["auto", "gloo", "nccl", "zmq"] = "auto"
    """How the learner's weights reach the launch-time actors. gloo: a torch.distributed
    group over host memory (CPU or GPU actors, a GPU shared with the learner). nccl: GPU to
    GPU, only when the learner and each actor have GPUs of their own (learner.gpus,
    actor.gpus). zmq: the learner's ZeroMQ publisher for every actor. auto: nccl where that
    placement allows it, else gloo (protocol/placement.py). The launcher resolves it into
    config.json, the learner ships its choice to every receiver at the rendezvous, and a
    receiver that cannot honour it fails at once instead of hanging."""
    weight_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """dtype of the weights on the wire. auto: bfloat16 when the learner computes in bf16
    and the vLLM actors run bf16 (the engine would round them to bf16 on load anyway, so
    it gets the same weights from half the bytes), else float32."""
    weight_bucket_mb: int = Field(256, ge=1, le=1 << 16)
    """Weights travel in buckets of at most this many MiB: with NCCL each side holds one
    bucket on its GPU besides the model, never a second full copy."""
    send_hwm: int = Field(64, ge=1, le=1_000_000)
    """ZeroMQ high-water mark of an actor's rollout socket, in messages: when the queue
    falls behind, sends block (backpressure) instead of dropping."""
