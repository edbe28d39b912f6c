"""A vLLM engine beside the trainer: started from the policy's weights, reloaded in place after each update.

Placement: colocated, one engine per rank (the CPU and single-node default). vLLM runs its scheduler and its worker
in processes of their own; the trainer's process holds only the client. The KV cache is bounded by
`rollout.kv_cache_gib`. On CPU the engine cannot sleep, so its memory stays held between generation and training.

Weight sync is a file handoff:
- the main rank writes the gathered weights once, as safetensors, into the run directory (`vllm/weights`);
- every engine reloads them in place (`collective_rpc("reload_weights")`), then drops its prefix cache.
vLLM repacks linear weights at load time on CPU, so the model's own `load_weights` cannot be called from outside.
Without dropping the prefix cache, a prompt seen before the sync would continue from stale keys and values.

A separate-engine mode (OpenRLHF/veRL style: engines on their own GPUs, weights broadcast over NCCL) would replace
`start` and `reload` only; the generator above them (`align/rollout/vllm_generator.py`) does not change.

Every cache, compiled kernel and socket vLLM writes goes under the run directory (`vllm/`), never `~/.cache` or /tmp.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from align.config import VLLM_INSTALL, RolloutConfig
from data_builders.errors import UserError

INSTALL = VLLM_INSTALL
SOCKET_DIR_CHARS = 70  # a unix socket path holds 107 bytes; vLLM appends a 37-character name


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    if not vllm_installed():
        raise UserError(f"rollout.engine=vllm but vLLM is not installed; install it with {INSTALL} (or set rollout.engine=hf)")


def check_head_size(config: Any) -> None:
    """vLLM's CPU attention takes a fixed list of head sizes; a model outside it is one clear error, not a dead engine."""
    if torch.cuda.is_available():
        return
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = CPUAttentionBackend.get_supported_head_sizes()
    except (ImportError, AttributeError):  # another vLLM layout: let the engine decide
        return
    if head not in sizes:
        raise UserError(f"rollout.engine=vllm: vLLM's CPU attention takes head sizes {', '.join(map(str, sizes))}; this model's is {head} "
                        "(hidden_size / num_attention_heads); use rollout.engine=hf")  # fmt: skip


def write_weights(state: dict[str, torch.Tensor], directory: Path) -> None:
    """One safetensors file, written beside and renamed over the last, so an engine never reads half a file.

    A tied LM head is written too: vLLM's in-place reload loads it as a layer of its own and fails without it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    seen: set[int] = set()
    tensors = {}
    for name, value in state.items():
        value = value.detach().to("cpu").contiguous()
        if value.data_ptr() in seen:  # safetensors refuses shared storage
            value = value.clone()
        seen.add(value.data_ptr())
        tensors[name] = value
    tmp = directory / "model.safetensors.partial"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / "model.safetensors")


class VLLMEngine:
    """One `vllm.LLM` for this rank, with the timings of its start and of every weight reload."""

    def __init__(self, root: Path, rollout: RolloutConfig, seed: int, rank: int = 0, world_size: int = 1):
        self.root, self.rollout, self.seed, self.rank, self.world_size = Path(root), rollout, seed, rank, world_size
        self.llm: Any = None
        self.holds: tuple | None = None  # (model id, submodule, version) of the weights loaded, set by the generator
        self.sync_seconds: list[float] = []  # the first is the start (weights written, engine up); the rest are in-place reloads
        self._socket_dir: Path | None = None

    @property
    def weights_dir(self) -> Path:
        return self.root / "weights"

    def environment(self) -> dict[str, str]:
        """Where vLLM and torch.compile write, plus quiet logs, no usage reports and no hub calls."""
        for name in ("cache", "inductor", "tmp"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        sockets = self.root / "ipc"
        if len(str(sockets)) > SOCKET_DIR_CHARS:  # too deep for a socket path: a short private directory instead
            self._socket_dir = sockets = Path(tempfile.mkdtemp(prefix="align-vllm-"))
        sockets.mkdir(parents=True, exist_ok=True)
        env = {"VLLM_CACHE_ROOT": str(self.root / "cache"), "TORCHINDUCTOR_CACHE_DIR": str(self.root / "inductor"),
               "TMPDIR": str(self.root / "tmp"), "VLLM_RPC_BASE_PATH": str(sockets), "VLLM_NO_USAGE_STATS": "1",
               "VLLM_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}  # fmt: skip
        if self.world_size > 1 and not torch.cuda.is_available():  # each rank's worker on its own core, not all on core 0
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(self.rank % max(1, os.cpu_count() or 1))
        return env

    def start(self, state: dict[str, torch.Tensor], config: Any, dtype: torch.dtype, write: bool = True, barrier: Any = None) -> float:
        """Write the weights (main rank), start the engine on them; the seconds it took."""
        require_vllm()
        check_head_size(config)
        began = time.perf_counter()
        if write:
            write_weights(state, self.weights_dir)
            config.save_pretrained(self.weights_dir)
        if barrier is not None:
            barrier()
        os.environ.update(self.environment())
        from vllm import LLM

        options: dict[str, Any] = {"max_model_len": self.rollout.max_model_len} if self.rollout.max_model_len else {}
        self.llm = LLM(model=str(self.weights_dir), skip_tokenizer_init=True, dtype=str(dtype).removeprefix("torch."),
                       enforce_eager=self.rollout.enforce_eager, kv_cache_memory_bytes=int(self.rollout.kv_cache_gib * 2**30),
                       seed=self.seed + self.rank, disable_log_stats=True, **options)  # fmt: skip
        self.sync_seconds.append(time.perf_counter() - began)
        return self.sync_seconds[-1]

    def reload(self, began: float) -> float:
        """Load the weights now in `weights_dir` into the running engine; the seconds since `began` (the write included)."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(self.weights_dir)})
        self.llm.reset_prefix_cache()
        self.sync_seconds.append(time.perf_counter() - began)
        return self.sync_seconds[-1]

    def generate(self, prompt_ids: list[list[int]], params: list[Any]) -> list[Any]:
        from vllm import TokensPrompt

        return self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params, use_tqdm=False)

    def close(self) -> None:
        if self.llm is not None:
            engine = getattr(self.llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            self.llm = None
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
