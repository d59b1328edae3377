"""typical (locally typical sampling) against docs/methods-2.md §8.4, through HF's own TypicalLogitsWarper (what the
option turns on), the filter of the vLLM processor against it, the TRL configuration it writes, and a trainer whose
sampled tokens all lie in the typical set of the policy's distribution."""

from __future__ import annotations

import json
import math
import os
from importlib import metadata
from pathlib import Path

import pytest
import torch
from helpers.trainers import build, cpu_args, generate, loss_and_grads, prompt_rows
from transformers.generation.logits_process import TypicalLogitsWarper

import rlvr_entropy.methods.typical as typical_module
from rlvr_entropy import EntropyGRPOConfig
from rlvr_entropy.config import build_method
from rlvr_entropy.methods import MethodConfigError
from rlvr_entropy.methods.typical import typical_filter

P = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04])
ENTROPY = 1.525476
DISTANCE = [0.609185, 0.139182, 0.371644, 0.777109, 1.287935, 1.693400]
KEPT = {  # tau -> probabilities after the filter (renormalised)
    0.9: [0.444444, 0.277778, 0.166667, 0.111111, 0.0, 0.0],
    0.5: [0.5, 0.3125, 0.1875, 0.0, 0.0, 0.0],
    0.2: [0.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # the mode (id 0) is dropped: its surprisal is far below the entropy
}


def hf_warped(scores: torch.Tensor, tau: float) -> torch.Tensor:
    return TypicalLogitsWarper(mass=tau)(torch.zeros(scores.size(0), 1, dtype=torch.long), scores)


@pytest.mark.parametrize("tau", sorted(KEPT))
def test_worked_example_through_hf_warper_and_our_filter(tau):
    scores = P.log().unsqueeze(0)  # (1, 6)
    warped = hf_warped(scores, tau)
    assert torch.softmax(warped, -1)[0].tolist() == pytest.approx(KEPT[tau], abs=1e-6)
    removed = typical_filter(scores, tau)
    assert (~removed[0]).tolist() == [p > 0 for p in KEPT[tau]]
    assert torch.equal(removed, torch.isinf(warped))


def test_worked_example_entropy_and_distances():
    logp = P.log()
    h = -(P * logp).sum()
    assert h.item() == pytest.approx(ENTROPY, abs=1e-6)
    assert (-logp - h).abs().tolist() == pytest.approx(DISTANCE, abs=1e-6)
    # top-p 0.5 would keep {0, 1}: typical keeps {0, 1, 2} at 0.5 and drops the mode at 0.2
    assert typical_filter(logp.unsqueeze(0), 0.2)[0, 0]


def test_filter_equals_hf_warper_on_random_rows_with_masked_tokens_and_per_row_mass():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 50, generator=gen) * torch.rand(64, 1, generator=gen) * 4  # flat to peaked rows
    scores[::3, :10] = -math.inf  # tokens an earlier processor removed
    scores[5] = 0.0  # a uniform row: every token ties
    for tau in (0.05, 0.2, 0.5, 0.9, 0.99):
        assert torch.equal(typical_filter(scores, tau), torch.isinf(hf_warped(scores, tau))), tau
    taus = torch.tensor([0.2, 0.9]).repeat(32).unsqueeze(1)  # (64, 1): one mass per row, as in a vLLM batch
    per_row = typical_filter(scores, taus)
    for tau in (0.2, 0.9):
        rows = (taus[:, 0] == tau).nonzero().squeeze(1)
        assert torch.equal(per_row[rows], torch.isinf(hf_warped(scores[rows], tau)))
    kept = ~typical_filter(scores, 0.5)
    assert kept.any(dim=1).all()  # never an empty set


@pytest.mark.parametrize("mass", [0.0, 1.0, -0.1, 1.5])
def test_mass_out_of_range(mass):
    with pytest.raises(MethodConfigError, match=r"typical.mass must be in \(0, 1\)"):
        build_method({"name": "typical", "mass": mass})


def test_default_mass_is_the_papers_mild_setting():
    assert build_method({"name": "typical"}).mass == 0.95


def config(tmp_path, mass=0.3, **overrides) -> EntropyGRPOConfig:
    return EntropyGRPOConfig(**cpu_args(tmp_path, methods=[{"name": "typical", "mass": mass}], **overrides))


def test_configure_sets_typical_p_and_keeps_other_generation_kwargs(tmp_path):
    assert config(tmp_path).generation_kwargs == {"typical_p": 0.3}
    merged = config(tmp_path, generation_kwargs='{"top_k": 5}')  # JSON text, as a command line gives it
    assert merged.generation_kwargs == {"top_k": 5, "typical_p": 0.3}
    assert config(tmp_path, generation_kwargs={"typical_p": 0.3}).generation_kwargs == {"typical_p": 0.3}
    with pytest.raises(MethodConfigError, match="already sets it to 0.5"):
        config(tmp_path, generation_kwargs={"typical_p": 0.5})


def test_vllm_needs_the_processor_plugin_and_names_the_alternatives(tmp_path, monkeypatch):
    monkeypatch.setattr(typical_module, "vllm_plugin_installed", lambda: False)
    with pytest.raises(MethodConfigError, match="use_vllm: false") as err:
        config(tmp_path, use_vllm=True)
    assert "top_p / min_p" in str(err.value) and "vLLM has no typical_p" in str(err.value)


def test_vllm_gets_the_mass_per_request_and_policy_statistics(tmp_path, monkeypatch):
    monkeypatch.setattr(typical_module, "vllm_plugin_installed", lambda: True)
    args = config(tmp_path, use_vllm=True, generation_kwargs={"extra_args": {"other": 1}})
    assert args.generation_kwargs == {"extra_args": {"other": 1, "typical_p": 0.3}}
    assert args.rollout_stats_source == "forward"  # vLLM's processed log-probs describe the filtered sampler
    with pytest.raises(MethodConfigError, match="rollout_stats_source: forward"):
        config(tmp_path, use_vllm=True, rollout_stats_source="vllm")
    with pytest.raises(MethodConfigError, match="not a vLLM sampling parameter"):
        config(tmp_path, use_vllm=True, generation_kwargs={"typical_p": 0.3})
    with pytest.raises(MethodConfigError, match="already sets it to 0.7"):
        config(tmp_path, use_vllm=True, generation_kwargs={"extra_args": {"typical_p": 0.7}})


def test_vllm_warns_that_sequence_level_importance_sampling_shrinks_filtered_completions(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(typical_module, "vllm_plugin_installed", lambda: True)
    with caplog.at_level("WARNING", logger=typical_module.__name__):
        config(tmp_path, use_vllm=True)  # TRL's default: sequence_mask
    assert "shrinks the gradient of long completions" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger=typical_module.__name__):
        config(tmp_path, use_vllm=True, vllm_importance_sampling_correction=False)
        config(tmp_path, use_vllm=True, vllm_importance_sampling_mode="token_truncate")
        config(tmp_path)
    assert "shrinks" not in caplog.text


class StepLogits:
    """Forward hook: the last position's logits of every decoding step, (B, V) each."""

    def __init__(self, model):
        self.steps: list[torch.Tensor] = []
        self.handle = model.register_forward_hook(lambda m, a, out: self.steps.append(out.logits[:, -1].detach().float()))

    def outside_typical_set(self, completion_ids, mask, tau, temperature):
        """How many counted sampled tokens lie outside the typical set of the raw distribution at their step."""
        self.handle.remove()
        logits = torch.stack(self.steps[: completion_ids.size(1)], dim=1) / temperature  # (B, T, V), tiny model
        removed = typical_filter(logits.flatten(0, 1), tau).view_as(logits)
        hit = removed.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)  # (B, T)
        return int((hit & (mask > 0)).sum()), logits


TAU = 0.2


@pytest.mark.e2e
def test_trainer_samples_only_typical_tokens_and_logs_the_policy_entropy(model_dir, tmp_path):
    rows = prompt_rows(4, 4)
    trainer = build(model_dir, tmp_path, [{"name": "typical", "mass": TAU}], max_completion_length=6, temperature=0.9)
    assert trainer.generation_config.typical_p == TAU and trainer.generation_kwargs["typical_p"] == TAU
    capture = StepLogits(trainer.model)
    out = generate(trainer, rows)
    ids, mask = out["completion_ids"], out["completion_mask"]
    outside, logits = capture.outside_typical_set(ids, mask, TAU, 0.9)
    assert outside == 0 and mask.sum() > 20
    # the logged rollout entropy is the policy's at temperature 0.9 (raw logits), not the filtered sampler's
    logp = torch.log_softmax(logits, -1)
    policy_h = -(logp.exp() * logp).sum(-1)
    expected = (policy_h * mask).sum() / mask.sum()
    assert trainer._metrics["train"]["rollout_entropy/mean"][-1] == pytest.approx(expected.item(), abs=1e-4)
    # the logged surprisal gap: mean |-log pi(sampled) - H| under the policy, over the rollout's tokens
    sampled = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    gap = ((-sampled - policy_h).abs() * mask).sum() / mask.sum()
    assert trainer._metrics["train"]["typical/surprisal_gap"][-1] == pytest.approx(gap.item(), abs=1e-4)
    # control: without the method the same check finds tokens outside the set (the test can fail)
    plain = build(model_dir, tmp_path / "plain", [], max_completion_length=6, temperature=0.9)
    assert plain.generation_config.typical_p in (None, 1.0)  # off
    capture = StepLogits(plain.model)
    out = generate(plain, rows)
    assert capture.outside_typical_set(out["completion_ids"], out["completion_mask"], TAU, 0.9)[0] > 0


@pytest.mark.e2e
def test_composes_with_ter_and_kl_cov(model_dir, tmp_path):
    methods = [{"name": "typical", "mass": TAU}, {"name": "ter", "coef": 0.5, "target": 0.1},
               {"name": "kl_cov", "ratio": 0.5, "base_clip": True}]
    trainer = build(model_dir, tmp_path, methods, max_completion_length=6)
    capture = StepLogits(trainer.model)
    inputs = generate(trainer, prompt_rows(4, 4))
    assert capture.outside_typical_set(inputs["completion_ids"], inputs["completion_mask"], TAU, 1.0)[0] == 0
    loss, grads = loss_and_grads(trainer, inputs)
    metrics = trainer._metrics["train"]
    assert "ter/penalty" in metrics and metrics["ter/penalty"][-1] > 0
    assert any(k.startswith("kl_cov/") for k in metrics)
    assert torch.isfinite(loss) and grads
    # without the other two the loss differs: they still act on the typical rollout
    alone = build(model_dir, tmp_path / "alone", methods[:1], max_completion_length=6)
    loss_alone, _ = loss_and_grads(alone, generate(alone, prompt_rows(4, 4)))
    assert loss.item() != pytest.approx(loss_alone.item(), abs=1e-6)


@pytest.mark.vllm
def test_vllm_processor_keeps_exactly_hf_typical_set(tiny_model_path, monkeypatch):
    """The processor inside a real vLLM engine (.venv-vllm): with the whole vocabulary of processed log-probs, the
    finite entries at each position are the typical set HF's warper keeps on the same model's logits."""
    pytest.importorskip("vllm", reason="vLLM is not installed (run in .venv-vllm)")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    engine = LLM(model=str(tiny_model_path), dtype="float32", enforce_eager=True, distributed_executor_backend="uni",
                 max_model_len=128, max_num_seqs=16, max_logprobs=-1, logprobs_mode="processed_logprobs", seed=0,
                 logits_processors=[typical_module.TypicalLogitsProcessor])
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    prompt = tok("57=")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    temperature = 0.7
    plain = SamplingParams(n=4, temperature=temperature, max_tokens=6, logprobs=-1, seed=1)
    filtered = SamplingParams(n=4, temperature=temperature, max_tokens=6, logprobs=-1, seed=1,
                              extra_args={"typical_p": TAU})
    outputs = engine.generate([{"prompt_token_ids": prompt}] * 2, [plain, filtered])  # one batch, mixed requests
    sizes = {}
    for out, tau in zip(outputs, (None, TAU), strict=True):
        for sample in out.outputs:
            ids = torch.tensor([prompt + list(sample.token_ids)])
            with torch.no_grad():
                logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature  # (T, V)
            kept = torch.tensor([[math.isfinite(pos[v].logprob) if v in pos else False for v in range(logits.size(1))]
                                 for pos in sample.logprobs])  # (T, V)
            expected = torch.ones_like(kept) if tau is None else ~typical_filter(logits, tau)
            assert torch.equal(kept, expected)
            sizes.setdefault(tau, []).append(int(kept.sum()))
    assert max(sizes[TAU]) < min(sizes[None])  # the filter acted, and only on the request that asked for it


@pytest.mark.vllm
def test_colocated_vllm_run_samples_through_the_plugin(tmp_path, monkeypatch):
    """Two GRPO steps with a colocated vLLM engine (.venv-vllm), the package's entry point simulated: the engine loads
    the processor, TRL hands it the mass through SamplingParams.extra_args, and the sampler's processed log-probs
    (which TRL compares with its own) move away from the policy's, as a filtered sampler's must."""
    pytest.importorskip("vllm", reason="vLLM is not installed (run in .venv-vllm)")
    from rlvr_entropy.config import load_recipe
    from rlvr_entropy.runner import train

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    real = metadata.entry_points

    def entry_points(**kwargs):
        if kwargs.get("group") == typical_module.VLLM_PLUGIN_GROUP:
            return metadata.EntryPoints([metadata.EntryPoint("typical", typical_module.VLLM_PROCESSOR,
                                                             typical_module.VLLM_PLUGIN_GROUP)])
        return real(**kwargs)

    monkeypatch.setattr(metadata, "entry_points", entry_points)
    recipe = Path(__file__).resolve().parents[2] / "recipes/tiny/typical.yaml"
    out = tmp_path / "run"
    overrides = ["max_steps=2", "per_device_train_batch_size=32", "num_generations=8", "steps_per_generation=1",
                 "data.num_prompts=16", "use_vllm=true", "vllm_mode=colocate", "vllm_gpu_memory_utilization=0.3",
                 "vllm_max_model_length=128", "reward_sandbox=thread", f"methods=[{{name: typical, mass: {TAU}}}]",
                 "eval=null", f"output_dir={out}"]
    train(load_recipe(recipe, overrides))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2
    # unfiltered, the two agree to < 1e-4 (tests/test_vllm.py); filtered, the sampled tokens' log-probs rise
    assert all(r["sampling/sampling_logp_difference/mean"] > 0.05 for r in steps), steps
    # TRL's sequence-level correction weighs each completion by the product of the kept masses (each >= tau, < 1)
    assert all(0 < r["sampling/importance_sampling_ratio/max"] < 1 for r in steps), steps
