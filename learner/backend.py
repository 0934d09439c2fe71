"""How the learner's policy is stepped: DeepSpeed (ZeRO 0-3) or plain torch, one interface.

The learner calls only :meth:`forward`, :meth:`backward`, :meth:`step`, :meth:`zero_grad`,
:meth:`iter_full_parameters`, :meth:`full_state_dict` and :meth:`save_state`; which
backend runs underneath is ``learner.backend``:

- "deepspeed": ``deepspeed.initialize`` with our torch AdamW as the client optimizer (so
  both backends have exactly the same update rule), ZeRO stage ``learner.zero_stage``,
  gradient accumulation over ``micro_batches_per_step`` with the
  boundary set by the learner. It runs on this CPU machine too: DeepSpeed's CPU
  accelerator falls back to gloo when oneCCL is not installed (``DS_ACCELERATOR=cpu`` is
  set when no GPU is visible), and tests check that one step matches the torch backend.
- "torch": loss.backward(), clip_grad_norm_, AdamW.step(): the reference semantics.
- "auto" (default): deepspeed when it imports, torch otherwise.

Both skip an optimizer step whose gradient is not finite and keep the last good weights:
torch and DeepSpeed stage 0 by checking the clipped norm themselves, ZeRO stages 1-3 by
DeepSpeed's own overflow check (``was_step_applied``), which on stage 0 does not exist
(it would apply a NaN step: measured).

The ranks of a multi-rank learner (torchrun / the DeepSpeed launcher) form torch's default
process group, which therefore belongs to this module; the weight sync to the actors uses
its own stateless group (protocol/weights.py).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from dashrl.protocol.config import LearnerConfig
from dashrl.protocol.runtime import free_port

log = logging.getLogger("dashrl.learner")


def deepspeed_available() -> bool:
    """True when ``import deepspeed`` works (it is a core dependency; a broken install is
    the reason this can be False)."""
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # ImportError, or DeepSpeed's own accelerator errors
        log.warning("DeepSpeed unavailable (%s): using the torch backend", e)
        return False
    return True


def init_ranks() -> tuple[int, int]:
    """(rank, world size) of this learner process; world size 1 unless started by
    torchrun / the DeepSpeed launcher (RANK and WORLD_SIZE in the environment)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class TorchBackend:
    """Plain torch: AdamW over the policy, global-norm clipping, skip on a non-finite norm.

    Args:
        model: the policy's forward module (learner/batch.py ``PolicyForward``, wrapping an
            HF causal LM as ``.model``), already on its device.
        lc: the learner config (lr, betas, weight decay, max grad norm).
    """

    name = "torch"

    def forward(self, *args, **kwargs):
        """Run the policy's forward (through the DeepSpeed engine when there is one)."""
        return self.module(*args, **kwargs)

    def __init__(self, model: torch.nn.Module, lc: LearnerConfig):
        self.module, self.lc = model, lc
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=lc.lr, betas=lc.betas, weight_decay=lc.weight_decay
        )

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate the gradient of ``loss`` (already scaled by 1/micro-batches)."""
        loss.backward()

    def step(self) -> tuple[float, bool]:
        """Clip and step; returns (policy grad norm before clipping, whether it stepped)."""
        norm = float(
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.lc.max_grad_norm)
        )
        took = math.isfinite(norm)
        if took:
            self.optimizer.step()
        self.zero_grad()
        return norm, took

    def zero_grad(self) -> None:
        """Drop the accumulated gradient (after a step, or to abandon a partial one)."""
        self.optimizer.zero_grad(set_to_none=True)

    def iter_full_parameters(self) -> Iterator[torch.Tensor]:
        """The full (unsharded) parameters in ``model.parameters()`` order, one at a time."""
        yield from self.module.parameters()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """HF name -> full parameter (CPU copies), for ``save_pretrained``; tied weights once."""
        names = [n.removeprefix("model.") for n, _ in self.module.named_parameters()]
        return {n: p.detach().cpu().clone()
                for n, p in zip(names, self.iter_full_parameters(), strict=True)}  # fmt: skip

    def parameter_shapes(self) -> list[torch.Tensor]:
        """Tensors with the full shapes and dtypes (for the weight layout hash)."""
        return list(self.module.parameters())

    def save_state(self, out: Path) -> None:
        """Optimizer state for a later resume (``optimizer.pt``)."""
        torch.save(self.optimizer.state_dict(), out / "optimizer.pt")

    def load_state(self, ckpt: Path) -> None:
        """Restore what :meth:`save_state` wrote (the weights come from the HF checkpoint).

        Raises:
            FileNotFoundError: the checkpoint has no optimizer state of this backend.
        """
        path = ckpt / "optimizer.pt"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no torch optimizer state to resume from")
        self.optimizer.load_state_dict(torch.load(path, weights_only=True))


class DeepSpeedBackend(TorchBackend):
    """The policy wrapped by ``deepspeed.initialize`` (see module docstring).

    Args:
        model: the policy.
        lc: the learner config (zero_stage, micro_batches_per_step, ...).

    Raises:
        RuntimeError: DeepSpeed cannot initialise.
    """

    name = "deepspeed"

    def __init__(self, model: torch.nn.Module, lc: LearnerConfig, rendezvous_port: int = 0):
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        if not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if "WORLD_SIZE" in os.environ:  # started by torchrun / the DeepSpeed launcher
                deepspeed.init_distributed(dist_backend=backend)
            else:  # a lone rank: a private rendezvous (DeepSpeed insists on LOCAL_RANK)
                # on the port the launcher reserved for the learner's ranks: a port picked
                # here could be one the launcher gave another socket that is not bound yet
                port = rendezvous_port or free_port()
                deepspeed.init_distributed(
                    dist_backend=backend, init_method=f"tcp://127.0.0.1:{port}",
                    rank=0, world_size=1, auto_mpi_discovery=False,
                )  # fmt: skip
        if "LOCAL_RANK" not in os.environ and torch.distributed.get_world_size() == 1:
            # DeepSpeed insists on LOCAL_RANK even for a lone rank whose group someone
            # else (an earlier backend in this process, a test) has already set up
            os.environ["LOCAL_RANK"] = "0"
        self.lc = lc
        self.stage = lc.zero_stage
        config = {
            "train_micro_batch_size_per_gpu": 1,  # unused: we feed micro-batches ourselves
            "gradient_accumulation_steps": lc.micro_batches_per_step,
            # stage 0 has no overflow check, so we clip (and check) ourselves there
            "gradient_clipping": lc.max_grad_norm if self.stage > 0 else 0.0,
            "zero_optimization": {"stage": self.stage},
            # mixed precision is bf16 autocast inside the policy's forward (learner/batch.py),
            # the same on both backends: DeepSpeed keeps fp32 weights and AdamW state
            "bf16": {"enabled": False},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 30,
        }
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=lc.lr, betas=lc.betas, weight_decay=lc.weight_decay
        )
        shapes = [torch.empty(p.shape, dtype=p.dtype, device="meta") for p in model.parameters()]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config
        )
        if self.stage == 0 and torch.distributed.get_world_size() == 1:
            # one rank: DeepSpeed would still flatten, "all-reduce" and copy back every
            # gradient at each boundary (12% of the learner's time in a py-spy profile)
            self.engine.enable_backward_allreduce = False
        self.module = self.engine.module
        self._shapes = shapes

    def forward(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate; ``last`` marks the micro-batch that ends the accumulation (DeepSpeed
        reduces gradients across ranks at that boundary)."""
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss, scale_wrt_gas=False)  # the learner already scales

    def step(self) -> tuple[float, bool]:
        if self.stage == 0:
            norm = float(
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.lc.max_grad_norm)
            )
            if not math.isfinite(norm):
                self.zero_grad()
                return norm, False
            self.engine.step()
            self.zero_grad()
            return norm, True
        self.engine.step()
        took = bool(self.engine.was_step_applied())
        norm = self.engine.get_global_grad_norm()
        self.zero_grad()
        return (float(norm) if norm is not None else float("nan")), took

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def iter_full_parameters(self) -> Iterator[torch.Tensor]:
        """Full parameters one at a time. Under ZeRO-3 each is gathered only while it is
        being consumed (every rank must iterate to the end together), so the weight
        broadcast never holds a second full copy of the model."""
        if self.stage < 3:
            yield from self.module.parameters()
            return
        from deepspeed.runtime.zero import GatheredParameters

        for p in self.module.parameters():
            with GatheredParameters([p], modifier_rank=None):
                yield p

    def parameter_shapes(self) -> list[torch.Tensor]:
        return self._shapes

    def save_state(self, out: Path) -> None:
        """DeepSpeed's own checkpoint (sharded optimizer state) under ``out/deepspeed``;
        every rank must call it."""
        self.engine.save_checkpoint(str(out / "deepspeed"), tag="state")

    def load_state(self, ckpt: Path) -> None:
        """Restore DeepSpeed's checkpoint (module and sharded optimizer state).

        Raises:
            FileNotFoundError: the checkpoint has no DeepSpeed state.
        """
        path = ckpt / "deepspeed"
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no DeepSpeed state to resume from")
        # DeepSpeed's checkpoint engine unpickles with weights_only=False, which runs any
        # code a planted file holds: load tensors and plain containers only
        self.engine.checkpoint_engine.load = _tensors_only_load
        loaded, _ = self.engine.load_checkpoint(str(path), tag="state")
        if loaded is None:
            raise FileNotFoundError(f"{path}: DeepSpeed found no checkpoint with tag 'state'")


def _tensors_only_load(path: str, map_location=None):
    """DeepSpeed checkpoint-engine ``load`` with ``weights_only=True``: tensors, plain
    containers and the few DeepSpeed value types its states hold, nothing executable.

    Raises:
        pickle.UnpicklingError: the file holds anything else (e.g. a planted object).
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # the value types DeepSpeed 0.19's ZeRO 0-3 states hold (found by loading each stage's
    # checkpoint with weights_only=True): plain data holders, no code on construction
    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


def make_backend(
    model: torch.nn.Module, lc: LearnerConfig, rendezvous_port: int = 0
) -> TorchBackend:
    """The backend ``learner.backend`` asks for ("auto": DeepSpeed when it imports).
    ``rendezvous_port``: a lone DeepSpeed rank's private process-group port (0: any free).

    Raises:
        ImportError: "deepspeed" asked for explicitly but not importable.
    """
    if lc.backend == "torch" or (lc.backend == "auto" and not deepspeed_available()):
        return TorchBackend(model, lc)
    return DeepSpeedBackend(model, lc, rendezvous_port)
