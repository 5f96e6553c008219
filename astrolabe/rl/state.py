"""The complete, resumable training state: policies, optimizer, schedules, controllers, RNG, step.

One checkpoint directory holds everything that shapes the future of a run (DESIGN.md, "Artifacts")::

    <dir>/lora/adapter_model.safetensors     trained adapter, standard PEFT format (generate --checkpoint)
    <dir>/lora/adapter_config.json
    <dir>/adapters/old.safetensors           sampling policy
    <dir>/adapters/ref.safetensors           lagging KL reference (reference="lagging" only)
    <dir>/adapters/ema.safetensors           float32 EMA shadow (EMA enabled only)
    <dir>/optimizer.pt                       AdamW + LR scheduler + GradScaler state dicts
    <dir>/dcp/                               instead of optimizer.pt when ``distributed_checkpoint`` (FSDP)
    <dir>/state.json                         step, FractionController, ReferenceRefresher, configs, extra
    <dir>/rng.pt                             torch CPU/CUDA, numpy, python random, registered generators
    <dir>/manifest.json                      written last: every piece with its files, sizes, sha256

Unlike the release (reference 7.2-7.3, 10.12) the trained weights (not the EMA) go to ``lora/``, the
optimizer state belongs to those weights, and the old/reference adapters, EMA, step and RNG streams are
all restored. :meth:`TrainingState.save` writes into a temporary sibling directory and renames it into
place, so a directory under the final name is always complete. :meth:`TrainingState.load` reads and
checks every piece before changing anything; a missing piece is an error naming it.

Sharded state (``parallel.strategy: fsdp``). After FSDP2's ``fully_shard`` every parameter is a ``DTensor``
shard; :meth:`TrainingState.rebind_parameters` takes the policies, EMA and optimizer over to those shards
(before the first step or load). With ``distributed_checkpoint`` set, :meth:`TrainingState.save` is called on
**every** rank: the adapters are gathered whole (``DTensor.full_tensor``, LoRA-sized) and rank 0 writes the
PEFT ``lora/`` and ``adapters/*.safetensors`` as above (what rollout, evaluate and generate read), while the
state that resumes training goes through ``torch.distributed.checkpoint`` into ``dcp/`` (one file per rank +
``.metadata``): the LoRA tensors of every adapter (``default``, ``old``, ``ref``) and the EMA by parameter
name, the optimizer state by parameter name (``get_state_dict``), the LR scheduler and the GradScaler.
DCP reshards on load, so :meth:`TrainingState.load` reads ``dcp/`` at any world size: sharded on N ranks, or
whole in one process without a process group (``no_dist``). The format is decided by the checkpoint (its
manifest's pieces), not by the loading run; a sharded state refuses a checkpoint without ``dcp/``.

Optimization (reference 5.4): AdamW over the ``default`` LoRA parameters; a step is
``unscale -> clip_grad_norm_(grad_clip) -> optimizer.step -> scaler.update -> scheduler.step ->
zero_grad -> EMA update -> step += 1``. Gradient accumulation (micro-batches weighted by their sample
counts, on one rank or across ranks) is :mod:`astrolabe.rl.accumulation`.

The selective-KL controller is a piece of this state (``state.json``): the ``label_uncertainty`` stage of
iteration k + 1 reads it from checkpoint k with :func:`read_controller_state`, updates it with its rewards
and hands the updated state to ``nft_update``, which saves it in checkpoint k + 1.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from astrolabe.artifacts.atomic import atomic_dir
from astrolabe.artifacts.manifest import sha256_file
from astrolabe.distributed import barrier, broadcast_object, is_initialized
from astrolabe.rl.lora import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    CHECKPOINT_LORA_DIR,
    LoRAConfig,
    LoraMismatchError,
    check_lora_compatible,
    check_same_keys,
    is_lora_parameter,
    read_adapter_tensors,
    read_lora_config,
    write_adapter,
)
from astrolabe.rl.optim import OptimConfig, StepStats, build_optimizer, build_scheduler, lr_factor  # noqa: F401
from astrolabe.rl.policies import TRAINED, PolicyConfig, PolicySet
from astrolabe.rl.rng import CheckpointError, capture_rng, restore_rng  # noqa: F401  (re-exported)
from astrolabe.rl.selective_kl import FractionController

logger = logging.getLogger(__name__)

FORMAT = "astrolabe.training_state"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE_JSON = "state.json"
OPTIMIZER_PT = "optimizer.pt"
RNG_PT = "rng.pt"
ADAPTERS_DIR = "adapters"
DCP_DIR = "dcp"  # torch.distributed.checkpoint of the sharded training state
DCP_METADATA = ".metadata"  # the file DCP writes last (its index of every rank's file)
SHARDED = "sharded"  # the piece of a distributed checkpoint that replaces "optimizer"


# ----------------------------------------------------------------------------------- files


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True))


def _load_manifest(d: Path) -> dict[str, Any]:
    """The checkpoint manifest of ``d``, checked for format; an error when there is none (incomplete save)."""
    path = d / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: {d} is not a complete training checkpoint (an interrupted save never "
            "leaves one under its final name); point to a checkpoint directory written by TrainingState.save"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r} v{manifest.get('format_version')} "
                              f"is not {FORMAT!r} v{FORMAT_VERSION}")
    return manifest


@contextmanager
def _single_process_dcp() -> Iterator[None]:
    """Silence DCP's warning that it runs without a process group (one process is a supported world size here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def read_controller_state(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The selective-KL controller piece of the checkpoint ``directory``, read without building a model.

    None when the checkpoint was saved without selective KL. The checkpoint must be complete (manifest, and
    a ``state.json`` matching its manifest entry); otherwise :class:`CheckpointError` names what is missing.
    """
    d = Path(directory)
    entry = _load_manifest(d)["files"].get(STATE_JSON)
    path = d / STATE_JSON
    if entry is None or not path.is_file() or path.stat().st_size != entry["bytes"]:
        raise CheckpointError(f"checkpoint {d}: {STATE_JSON} is missing or does not match its manifest entry")
    state = json.loads(path.read_text())
    if "controller" not in state:
        raise CheckpointError(f"checkpoint {d}: {STATE_JSON} has no 'controller' piece; the checkpoint is foreign")
    return state["controller"]


class TrainingState:
    """Policies + optimizer + LR scheduler + grad scaler + step + controllers + RNG + caller ``extra``.

    ``controller`` is the selective-KL :class:`FractionController` (None when selective KL is off); the
    KL-reference refresher lives in ``policies.refresher``. ``extra`` is a JSON-serialisable dict for the
    caller (e.g. the prompt sampler position). Register every generator that must resume with
    :meth:`register_generator`.
    """

    def __init__(self, policies: PolicySet, optim: OptimConfig, controller: FractionController | None = None) -> None:
        self.policies = policies
        self.optim_cfg = optim
        self.controller = controller
        self.step = 0
        self.extra: dict[str, Any] = {}
        self.generators: dict[str, torch.Generator | np.random.Generator] = {}
        self.params = policies.trainable_parameters()
        self.optimizer = build_optimizer(self.params, optim)
        self.scheduler = build_scheduler(self.optimizer, optim)
        device_type = self.params[0].device.type
        self.scaler = torch.amp.GradScaler(device_type, enabled=optim.precision == "fp16")
        self.distributed_checkpoint = False  # save through torch.distributed.checkpoint (module docstring)

    @property
    def is_sharded(self) -> bool:
        """Whether the trained parameters are FSDP2 ``DTensor`` shards (after :meth:`rebind_parameters`)."""
        from torch.distributed.tensor import DTensor

        return any(isinstance(p, DTensor) for p in self.params)

    def rebind_parameters(self) -> None:
        """Take the policies, EMA and optimizer over to the model's new parameters (FSDP2's ``fully_shard``
        replaced them by ``DTensor`` shards). Only before the first step and before :meth:`load`."""
        if self.step or self.optimizer.state:
            raise RuntimeError("rebind_parameters() after an optimizer step or a load would drop the optimizer state; "
                               "shard the model right after building the state")
        self.policies.rebind_parameters()
        self.params = self.policies.trainable_parameters()
        self.optimizer = build_optimizer(self.params, self.optim_cfg)
        self.scheduler = build_scheduler(self.optimizer, self.optim_cfg)

    # ------------------------------------------------------------------ setup
    def register_generator(self, name: str, generator: torch.Generator | np.random.Generator) -> None:
        """Save and restore this generator's state with the checkpoint."""
        if not isinstance(generator, (torch.Generator, np.random.Generator)):
            raise TypeError(f"generator {name!r} must be a torch.Generator or numpy Generator, got {type(generator)}")
        if name in self.generators and self.generators[name] is not generator:
            raise ValueError(f"a different generator is already registered as {name!r}")
        self.generators[name] = generator

    @contextmanager
    def autocast(self) -> Iterator[None]:
        """Autocast of training forwards at ``optim.precision`` (no-op for fp32)."""
        prec = self.optim_cfg.precision
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec)
        with torch.autocast(self.params[0].device.type, dtype=dtype, enabled=dtype is not None):
            yield

    # ------------------------------------------------------------------ optimization
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss`` (scaled by the GradScaler when fp16); weight it first when accumulating."""
        if loss.dim() != 0:
            raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}; reduce it (mean) first")
        self.scaler.scale(loss).backward()

    def optimizer_step(self) -> StepStats:
        """Unscale, clip, step, update scaler and scheduler, zero grads, update the EMA, ``step += 1``."""
        self.scaler.unscale_(self.optimizer)
        clip = self.optim_cfg.grad_clip
        max_norm = clip if clip is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        lr = float(self.optimizer.param_groups[0]["lr"])
        scale_before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        skipped = self.scaler.is_enabled() and self.scaler.get_scale() < scale_before
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        d = self.policies.update_ema(self.step)
        self.step += 1
        return StepStats(step=self.step, grad_norm=grad_norm, lr=lr, ema_decay=d, skipped=skipped)

    def update_old(self, iterations: int) -> float:
        """End of a training phase: blend the old policy toward the trained one, with the decay after
        ``iterations`` completed iterations (not optimizer steps; :mod:`astrolabe.rl.schedules`)."""
        return self.policies.update_old(iterations)

    # ------------------------------------------------------------------ save
    def _configs(self) -> dict[str, Any]:
        return {
            "lora": self.policies.lora.model_dump(mode="json"),
            "policy": self.policies.cfg.model_dump(mode="json"),
            "optim": self.optim_cfg.model_dump(mode="json"),
        }

    def _state_json(self) -> dict[str, Any]:
        try:
            json.dumps(self.extra)
        except TypeError as e:
            raise TypeError(
                f"TrainingState.extra must be JSON-serialisable ({e}); store plain numbers/strings/lists"
            ) from None
        refresher = self.policies.refresher
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": self.step,
            "controller": self.controller.state_dict() if self.controller is not None else None,
            "refresher": refresher.state_dict() if refresher is not None else None,
            "configs": self._configs(),
            "extra": self.extra,
        }

    def expected_pieces(self, sharded: bool | None = None) -> dict[str, list[str]]:
        """Every piece this state needs in a checkpoint, with its files (relative paths).

        ``sharded`` (default: ``distributed_checkpoint``): the optimizer state is in ``dcp/`` (piece
        ``"sharded"``, whose files depend on the saving world size: only ``.metadata`` is named here).
        """
        sharded = self.distributed_checkpoint if sharded is None else sharded
        pieces = {"lora": [f"{CHECKPOINT_LORA_DIR}/{ADAPTER_WEIGHTS_NAME}", f"{CHECKPOINT_LORA_DIR}/{ADAPTER_CONFIG_NAME}"]}
        for name in self.policies.stored_policies():
            pieces[name] = [f"{ADAPTERS_DIR}/{name}.safetensors"]
        pieces |= {SHARDED: [f"{DCP_DIR}/{DCP_METADATA}"]} if sharded else {"optimizer": [OPTIMIZER_PT]}
        pieces |= {"state": [STATE_JSON], "rng": [RNG_PT]}
        return pieces

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Atomically write the whole state to ``directory`` (module docstring); returns it.

        With ``distributed_checkpoint`` every rank calls it (collectives); rank 0 creates the temporary
        directory, every rank writes its DCP file into it, rank 0 writes the rest and publishes it, and every
        rank returns once it is published. Otherwise one rank alone calls it.
        """
        final = Path(directory)
        if not self.distributed_checkpoint:
            with atomic_dir(final) as tmp:
                self._write_pieces(tmp)
        else:
            main = not is_initialized() or torch.distributed.get_rank() == 0
            with atomic_dir(final) if main else nullcontext(None) as tmp:
                self._write_pieces(Path(broadcast_object(str(tmp) if main else None)), main)
            barrier()
        logger.info("saved training state at step %d to %s", self.step, final)
        return final

    def _sharded_state(self) -> dict[str, Any]:
        """The DCP state dict (module docstring); tensors are the live ones, so ``dcp.load`` fills them in place."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.policies.model, self.optimizer)
        out = {"model": {k: v for k, v in model_sd.items() if is_lora_parameter(k)}, "optimizer": optim_sd,
               "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}
        if self.policies.ema is not None:
            out["ema"] = dict(self.policies.ema)
        return out

    def _load_sharded(self, path: Path) -> None:
        """Read ``dcp/`` into this state (resharded to the current world size; no process group needed)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        sd = self._sharded_state()
        with _single_process_dcp():
            dcp.load(sd, checkpoint_id=str(path), no_dist=not is_initialized())
        set_state_dict(self.policies.model, self.optimizer, model_state_dict=sd["model"],
                       optim_state_dict=sd["optimizer"], options=StateDictOptions(strict=False))
        self.scheduler.load_state_dict(sd["scheduler"])
        self.scaler.load_state_dict(sd["scaler"])

    def _write_pieces(self, tmp: Path, main: bool = True) -> None:
        """Write every piece into ``tmp``; with ``distributed_checkpoint`` every rank calls it (``main`` writes
        the files)."""
        full = {name: self.policies.tensors(name) for name in (TRAINED, *self.policies.stored_policies())}  # gathered
        if self.distributed_checkpoint:
            import torch.distributed.checkpoint as dcp

            with _single_process_dcp():
                dcp.save(self._sharded_state(), checkpoint_id=str(tmp / DCP_DIR), no_dist=not is_initialized())
        if not main:
            return
        write_adapter(full.pop(TRAINED), self.policies.model.peft_config[TRAINED], tmp / CHECKPOINT_LORA_DIR)
        (tmp / ADAPTERS_DIR).mkdir()
        for name, tensors in full.items():
            save_file(tensors, str(tmp / ADAPTERS_DIR / f"{name}.safetensors"), metadata={"format": "pt"})
        if not self.distributed_checkpoint:
            torch.save(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(),
                },
                tmp / OPTIMIZER_PT,
            )
        _write_json(tmp / STATE_JSON, self._state_json())
        torch.save(capture_rng(self.generators), tmp / RNG_PT)
        pieces = self.expected_pieces()
        if self.distributed_checkpoint:  # every rank's file
            pieces[SHARDED] = sorted(str(f.relative_to(tmp)) for f in (tmp / DCP_DIR).iterdir())
        files = {
            f: {"bytes": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)} for fs in pieces.values() for f in fs
        }
        _write_json(tmp / MANIFEST, {"format": FORMAT, "format_version": FORMAT_VERSION, "step": self.step,
                                     "pieces": pieces, "files": files})

    # ------------------------------------------------------------------ load
    def load(
        self, directory: str | os.PathLike[str], allow_config_change: bool = False, verify_checksums: bool = False
    ) -> None:
        """Restore every piece from ``directory``. Everything is read and checked before anything changes.

        Errors: no/foreign manifest, a missing piece (named), a file whose size (or sha256) differs from the
        manifest, a different LoRA config or policy layout, a controller present on one side only, other
        registered generators. Changed optimizer/policy hyper-parameters are errors unless
        ``allow_config_change`` (then logged as warnings). A checkpoint with ``dcp/`` (saved with
        ``distributed_checkpoint``) is read through DCP at any world size, every rank calling ``load``; the
        whole-tensor format cannot be loaded into a sharded state.
        """
        d = Path(directory)
        sharded = SHARDED in _load_manifest(d).get("pieces", {})
        if self.is_sharded and not sharded:
            raise CheckpointError(
                f"checkpoint {d} holds whole tensors (saved with parallel.strategy none or ddp) but this state is "
                "sharded (FSDP on several ranks): resume it in one process or with parallel.strategy=ddp"
            )
        manifest = self._read_manifest(d, verify_checksums, sharded)
        state = json.loads((d / STATE_JSON).read_text())
        self._check_configs(d, state, allow_config_change)
        lora_dir = d / CHECKPOINT_LORA_DIR
        check_lora_compatible(self.policies.lora, read_lora_config(lora_dir), str(lora_dir))
        tensors = {TRAINED: read_adapter_tensors(lora_dir)}
        for name in self.policies.stored_policies():
            tensors[name] = load_file(str(d / ADAPTERS_DIR / f"{name}.safetensors"))
        optim = {} if sharded else torch.load(d / OPTIMIZER_PT, map_location="cpu", weights_only=True)
        rng = torch.load(d / RNG_PT, map_location="cpu", weights_only=True)
        for key in () if sharded else ("optimizer", "scheduler", "scaler"):
            if key not in optim:
                raise CheckpointError(f"{d / OPTIMIZER_PT} lacks the {key!r} state; the checkpoint is incomplete")
        self._check_controllers(state)
        for name, t in tensors.items():
            expected = self.policies.ema if name == "ema" else self.policies.parameters_of(name)
            check_same_keys(expected, t, f"checkpoint {d}: {name!r} adapter")
        self._check_generators(rng)

        # ---- apply (all pieces are present and consistent)
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])
        if self.policies.refresher is not None:
            self.policies.refresher.load_state_dict(state["refresher"])
        if sharded:  # adapters, EMA and optimizer from dcp/ (the safetensors copies hold the same values)
            self._load_sharded(d / DCP_DIR)
        else:
            for name, t in tensors.items():
                self.policies.load_tensors(name, t)
            self.optimizer.load_state_dict(optim["optimizer"])
            self.scheduler.load_state_dict(optim["scheduler"])
            self.scaler.load_state_dict(optim["scaler"])
        restore_rng(rng, self.generators)
        self.step = int(state["step"])
        self.extra = dict(state["extra"])
        logger.info("loaded training state at step %d from %s (%d files)", self.step, d, len(manifest["files"]))

    def _read_manifest(self, d: Path, verify_checksums: bool, sharded: bool) -> dict[str, Any]:
        manifest = _load_manifest(d)
        for piece, files in self.expected_pieces(sharded).items():
            if piece not in manifest["pieces"]:
                raise CheckpointError(f"checkpoint {d} has no {piece!r} piece (needed by the current config); "
                                      "it was saved by a run with another policy/EMA configuration")
            for f in sorted(set(files) | set(manifest["pieces"][piece])):
                if not (d / f).is_file():
                    raise CheckpointError(f"checkpoint {d} is missing the {piece!r} piece: file {f} not found")
                entry = manifest["files"].get(f)
                if entry is None or (d / f).stat().st_size != entry["bytes"]:
                    raise CheckpointError(
                        f"checkpoint {d}: {f} ({piece!r}) does not match its manifest entry; the file is corrupt"
                    )
                if verify_checksums and sha256_file(d / f) != entry["sha256"]:
                    raise CheckpointError(f"checkpoint {d}: sha256 of {f} ({piece!r}) differs from the manifest")
        extra_pieces = sorted(set(manifest["pieces"]) - set(self.expected_pieces(sharded)))
        if extra_pieces:
            raise CheckpointError(f"checkpoint {d} holds pieces {extra_pieces} the current config does not use "
                                  "(e.g. a lagging reference or an EMA); resume with the saved run's policy config")
        return manifest

    def _check_configs(self, d: Path, state: Mapping[str, Any], allow_change: bool) -> None:
        if state.get("format") != FORMAT:
            raise CheckpointError(f"{d / STATE_JSON} is not a training-state file")
        saved, now = state["configs"], self._configs()
        if LoRAConfig.model_validate(saved["lora"]) != self.policies.lora:
            raise LoraMismatchError(
                f"checkpoint {d} was trained with LoRA config {saved['lora']}, the current one is {now['lora']}; "
                "resume with the same LoRA config"
            )
        for section, model in (("policy", PolicyConfig), ("optim", OptimConfig)):
            current = self.policies.cfg if section == "policy" else self.optim_cfg
            if model.model_validate(saved[section]) != current:
                msg = f"{section} config changed since checkpoint {d}: saved {saved[section]}, now {now[section]}"
                if not allow_change:
                    raise CheckpointError(msg + "; resume with the saved config or pass allow_config_change=True")
                logger.warning(msg)

    def _check_generators(self, rng: Mapping[str, Any]) -> None:
        saved = set(rng["torch_generators"]) | set(rng["numpy_generators"])
        if saved != set(self.generators):
            raise CheckpointError(
                f"rng.pt holds generators {sorted(saved)} but {sorted(self.generators)} are registered; register "
                "exactly the generators of the saved run (TrainingState.register_generator) before load()"
            )

    def _check_controllers(self, state: Mapping[str, Any]) -> None:
        if (state["controller"] is None) != (self.controller is None):
            have = "has" if state["controller"] is not None else "has no"
            raise CheckpointError(
                f"the checkpoint {have} selective-KL FractionController state but the current run "
                f"{'has none' if self.controller is None else 'has one'}; enable/disable selective KL as in the saved run"
            )
        if (state["refresher"] is None) != (self.policies.refresher is None):
            raise CheckpointError(
                "the checkpoint and the current run disagree on the lagging KL reference (refresher state)"
            )
