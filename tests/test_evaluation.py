"""Evaluation: the pass@k estimator, majority vote, the figures of a dataset, sharding, data specs and the CLI.

Unit tests run a scripted sampler (known completions and entropies); the tests that sample the tiny model
check that generation's entropy is the training pass's entropy of the same tokens, and the CLI end to end.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from rlvr_entropy.cli import main
from rlvr_entropy.config import RecipeError, load_recipe, parse_data_spec
from rlvr_entropy.evaluation import (
    EvaluationError,
    Sample,
    batch_seed,
    cut_at_eos,
    evaluate_dataset,
    format_table,
    k_values,
    majority_vote,
    pass_at_k,
    report_json,
)
from rlvr_entropy.periodic_eval import load_eval_rows

REPO = Path(__file__).resolve().parents[1]
EVAL_SETS = sorted((REPO / "recipes" / "eval").glob("*.yaml"))


# ----------------------------------------------------------------------------------------------- estimators


@pytest.mark.parametrize("n", range(1, 7))
def test_pass_at_k_equals_brute_force_enumeration(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            expected = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_k_refuses_impossible_counts_and_stays_finite_for_large_n():
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    assert pass_at_k(1024, 1, 1) == pytest.approx(1 / 1024)
    assert pass_at_k(1024, 3, 512) == pytest.approx(1 - (512 * 511 * 510) / (1024 * 1023 * 1022))


def test_k_values_are_powers_of_two_and_k():
    assert k_values(1) == [1]
    assert k_values(8) == [1, 2, 4, 8]
    assert k_values(6) == [1, 2, 4, 6]


def test_majority_vote_groups_equivalent_answers_and_scores_ties_by_their_share():
    assert majority_vote(["0.5", "\\frac{1}{2}", "3", None], "1/2") == 1.0  # 0.5 and \frac{1}{2} vote together
    assert majority_vote(["3", "3", "0.5", None, None, None], "0.5") == 0.0  # no-answer samples do not vote
    assert majority_vote(["3", "4"], "3") == 0.5  # a tie: the share of tied groups that are correct
    assert majority_vote(["3", "4", "4", "3", "5"], "4") == 0.5
    assert majority_vote([None, None], "3") == 0.0
    assert majority_vote([], "3") == 0.0


# ----------------------------------------------------------------------------------------------- a dataset


class ScriptedSampler:
    """Answers prompt ``i`` with ``script[prompt][j]`` for sample ``j``; token entropies 0.1·(token index + 1)."""

    def __init__(self, script: dict[str, list[str]], budget_hit: set[str] = frozenset()) -> None:
        self.script, self.budget_hit, self.calls = script, budget_hit, []

    def __call__(self, prompts, n, seed, max_new_tokens):
        self.calls.append((tuple(prompts), seed))
        out = []
        for p in prompts:
            texts = self.script[p][:n]
            out.append([Sample(t, list(range(len(t))), 0.1 * torch.arange(1, len(t) + 1, dtype=torch.float32),
                               t in self.budget_hit) for t in texts])
        return out


def test_figures_of_a_scripted_dataset():
    rows = Dataset.from_dict({"prompt": ["a", "b", "c"], "answer": ["1", "\\frac{1}{2}", "7"]})
    script = {"a": ["1", "2", "1", "x"], "b": ["\\boxed{0.5}", "0.25", "0.25", "y"], "c": ["8", "9", "8", "<answer>7"]}
    report = evaluate_dataset(ScriptedSampler(script, budget_hit={"<answer>7"}), rows, "toy",
                              samples=4, k=4, max_new_tokens=8, batch_size=2)
    f = report.figures
    assert (f["prompts"], f["samples"]) == (3, 4)
    correct = [[True, False, True, False], [True, False, False, False], [False, False, False, False]]
    assert [r.correct for r in report.prompts] == correct
    # an unclosed <answer> tag has no answer (it was cut off)
    assert report.prompts[2].extracted == ["8", "9", "8", None]
    assert f["pass@1"] == pytest.approx((2 / 4 + 1 / 4 + 0) / 3)
    assert f["pass@2"] == pytest.approx((pass_at_k(4, 2, 2) + pass_at_k(4, 1, 2)) / 3)
    assert f["pass@4"] == pytest.approx(2 / 3)
    assert f["maj@4"] == pytest.approx((1 + 0 + 0) / 3)  # b: 0.25 outvotes 0.5; c: 8 wins
    lengths = [len(t) for p in "abc" for t in script[p]]
    assert f["length"] == pytest.approx(sum(lengths) / 12)
    assert f["truncated"] == pytest.approx(1 / 12)
    tokens = torch.cat([0.1 * torch.arange(1, n + 1, dtype=torch.float32) for n in lengths])
    assert f["entropy"] == pytest.approx(float(tokens.mean()), abs=1e-6)  # every token once, no padding
    assert f["entropy/p50"] == pytest.approx(float(tokens.median()), abs=0.051)
    assert report.prompts[0].entropy[0] == pytest.approx(0.1)


def test_k_above_the_samples_is_refused():
    rows = Dataset.from_dict({"prompt": ["a"], "answer": ["1"]})
    with pytest.raises(EvaluationError, match="k \\(4\\) is larger than the samples per prompt \\(2\\)"):
        evaluate_dataset(ScriptedSampler({"a": ["1", "2"]}), rows, "toy", samples=2, k=4, max_new_tokens=4)


def test_sharded_evaluation_equals_one_process_and_keeps_processes_in_step():
    """Batches are seeded by their index, so two processes give one process's figures; each makes as many calls."""
    prompts = [str(i) for i in range(7)]
    script = {p: [p, "x", str(int(p) % 3)] for p in prompts}
    rows = Dataset.from_dict({"prompt": prompts, "answer": prompts})
    one = evaluate_dataset(ScriptedSampler(script), rows, "toy", samples=3, k=2, max_new_tokens=4, batch_size=2)
    samplers = [ScriptedSampler(script), ScriptedSampler(script)]
    local1 = []
    evaluate_dataset(samplers[1], rows, "toy", samples=3, k=2, max_new_tokens=4, batch_size=2, process_index=1,
                     num_processes=2, gather=lambda items: local1.extend(items) or items)
    two = evaluate_dataset(samplers[0], rows, "toy", samples=3, k=2, max_new_tokens=4, batch_size=2, process_index=0,
                           num_processes=2, gather=lambda items: items + local1)
    assert two.figures == one.figures
    assert [r.prompt for r in two.prompts] == prompts
    assert len(samplers[0].calls) == len(samplers[1].calls) == 2  # 4 batches over 2 processes
    assert {seed for _, seed in samplers[0].calls} == {batch_seed(0, 0), batch_seed(0, 2)}


def test_cut_at_eos_keeps_the_eos_and_flags_truncation():
    completion = torch.tensor([[5, 2, 9, 9], [5, 6, 7, 8], [2, 0, 0, 0]])
    rows, truncated = cut_at_eos(completion, [2])
    assert rows == [[5, 2], [5, 6, 7, 8], [2]]
    assert truncated == [False, True, False]


def test_table_markdown_and_json():
    rows = Dataset.from_dict({"prompt": ["a"], "answer": ["1"]})
    report = evaluate_dataset(ScriptedSampler({"a": ["1", "2"]}), rows, "toy", samples=2, k=2, max_new_tokens=4)
    table = format_table([("m", report)])
    assert table.splitlines()[0].split()[:6] == ["model", "dataset", "prompts", "x", "n", "pass@1"]
    assert "| m | toy | 1 x 2 | 0.500 | 1.000 |" in format_table([("m", report)], markdown=True)
    payload = report_json([("m", report)], {"k": 2}, save_samples=True)
    sample = payload["results"][0]["prompts"][0]["samples"][1]
    assert sample == {"completion": "2", "extracted": "2", "correct": False, "tokens": 1, "truncated": False,
                      "entropy": pytest.approx(0.1)}
    assert "prompts" not in report_json([("m", report)], {}, save_samples=False)["results"][0]
    json.dumps(payload)


# ----------------------------------------------------------------------------------------------- data specs


def test_data_spec_strings():
    spec = parse_data_spec("task:arithmetic_think,num_prompts=16")
    assert (spec.task, spec.dataset, spec.num_prompts, spec.name) == ("arithmetic_think", None, 16, "arithmetic_think")
    spec = parse_data_spec("openai/gsm8k,config=main,split=test,prompt=question,template=gsm8k,chat=true")
    assert (spec.dataset, spec.config, spec.split, spec.prompt_column, spec.template, spec.chat, spec.name) == (
        "openai/gsm8k", "main", "test", "question", "gsm8k", True, "gsm8k")
    # a template keeps its commas and braces; a number stays a string where the field is text
    spec = parse_data_spec("data/x.jsonl,template={prompt}, then answer in \\boxed{},name=x1")
    assert (spec.dataset, spec.template, spec.name) == ("data/x.jsonl", "{prompt}, then answer in \\boxed{}", "x1")
    with pytest.raises(RecipeError, match="unknown key 'data.promt'. Did you mean 'prompt"):
        parse_data_spec("x.jsonl,promt=q")
    with pytest.raises(RecipeError, match="evaluation dataset file not found"):
        parse_data_spec("recipes/eval/none.yaml")


def test_eval_section_is_checked_when_the_recipe_loads():
    base = REPO / "recipes" / "tiny" / "grpo.yaml"
    recipe = load_recipe(base, ["eval={datasets: [task:arithmetic, recipes/eval/gsm8k.yaml], k: 4}"])
    assert [d.name for d in recipe.evaluation.datasets] == ["arithmetic", "gsm8k"]
    for bad, message in [
        ("eval={datasets: [task:arithmetic], k: 8, samples: 4}", "k \\(8\\) is larger than the samples"),
        ("eval={datasets: []}", "list at least one dataset"),
        ("eval={datasets: [task:arithmetic, task:arithmetic]}", "named alike"),
        ("eval={datasets: [task:arithmetic], evry: 5}", "unknown key 'eval.evry'. Did you mean 'every'"),
        ("eval.every=0", "eval.every must be >= 1"),
        ("data.user_message=x", "'data.user_message' was renamed: use data.template"),
    ]:
        with pytest.raises(RecipeError, match=message):
            load_recipe(base, [bad])


@pytest.mark.parametrize("path", EVAL_SETS, ids=lambda p: p.stem)
def test_benchmark_sets_name_their_hub_source_without_downloading(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and first.endswith("."), first
    spec = parse_data_spec(str(path))
    assert spec.name == path.stem and spec.task is None and spec.split
    assert spec.dataset.count("/") == 1 and not Path(spec.dataset).exists()  # a hub id, read on a cluster
    assert spec.template in ("boxed", "gsm8k") and spec.chat


def test_there_is_a_set_for_each_benchmark_the_papers_report():
    assert {p.stem for p in EVAL_SETS} >= {"math500", "aime2024", "aime2025", "amc2023", "gsm8k"}


# Each benchmark's column layout (as on the hub), a LaTeX or numeric answer, and completions in the forms models
# write: only math-verify (or the GSM8K '####' reading) can tell the right ones.
LAYOUTS = {
    "math500": ({"problem": "What is 1/2 as a fraction?", "answer": "\\frac{1}{2}", "subject": "Algebra", "level": 1},
                ["so \\boxed{0.5}", "\\boxed{\\dfrac{1}{2}}", "\\boxed{2}"], [True, True, False]),
    "aime2024": ({"problem": "Find n.", "answer": "204", "solution": "..."},
                 ["\\boxed{204}", "\\boxed{240}", "no box"], [True, False, False]),
    "aime2025": ({"problem": "Find m.", "answer": "70", "id": "0"},
                 ["\\boxed{70}", "\\boxed{070}", "\\boxed{7}"], [True, True, False]),
    "amc2023": ({"question": "Compute it.", "answer": 27.0, "id": 0, "url": "https://..."},
                ["\\boxed{27}", "\\boxed{\\frac{54}{2}}", "\\boxed{28}"], [True, True, False]),
    "gsm8k": ({"question": "How many clips?", "answer": "48/2 = <<48/2=24>>24 ...\n#### 72"},
              ["She sold 72.\n#### 72", "\\boxed{72}", "#### 24"], [True, True, False]),
}


@pytest.mark.parametrize("path", EVAL_SETS, ids=lambda p: p.stem)
def test_benchmark_sets_evaluate_on_local_files_in_their_column_layout(path, tmp_path):
    row, completions, correct = LAYOUTS[path.stem]
    local = tmp_path / f"{path.stem}.jsonl"
    local.write_text(json.dumps(row) + "\n")
    spec = parse_data_spec(f"{path},dataset={local}")
    rows = load_eval_rows(spec, None)
    prompt = rows[0]["prompt"]
    assert isinstance(prompt, list) and prompt[0]["role"] == "user"  # the chat template will be applied
    assert prompt[0]["content"].startswith(row.get("problem", row.get("question")))
    assert "\\boxed{}" in prompt[0]["content"] or "####" in prompt[0]["content"]
    script = {json.dumps(prompt): completions}
    keyed = rows.map(lambda r: {"prompt": json.dumps(r["prompt"])})
    report = evaluate_dataset(ScriptedSampler(script), keyed, spec.name, samples=3, k=2, max_new_tokens=8)
    assert report.prompts[0].correct == correct
    assert report.figures["pass@1"] == pytest.approx(sum(correct) / 3)


def test_data_problems_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "1+1=", "a": "2"}\n{oops\n')
    with pytest.raises(RecipeError, match=f"{bad}: cannot read it as JSONL"):
        load_eval_rows(parse_data_spec(str(bad)), None)
    good = tmp_path / "good.jsonl"
    good.write_text('{"q": "1+1=", "a": "2"}\n')
    with pytest.raises(RecipeError, match="no column 'prompt' \\(data.prompt_column\\); its columns are \\['q', 'a'\\]"):
        load_eval_rows(parse_data_spec(str(good)), None)
    with pytest.raises(RecipeError, match="no column 'answer'"):
        load_eval_rows(parse_data_spec(f"{good},prompt=q"), None)
    with pytest.raises(RecipeError, match="placeholder\\(s\\) \\{level\\} name no column"):
        load_eval_rows(parse_data_spec(f"{good},prompt=q,answer=a,template={{q}} at level {{level}}"), None)
    rows = load_eval_rows(parse_data_spec(f"{good},prompt=q,answer=a,template=Q: {{q}} A:"), None)
    assert rows[0]["prompt"] == "Q: 1+1= A:" and rows[0]["answer"] == "2"
    with pytest.raises(RecipeError, match="data file not found"):
        load_eval_rows(parse_data_spec(str(tmp_path / "none.jsonl")), None)
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(RecipeError, match="unknown data file type '.txt'"):
        load_eval_rows(parse_data_spec(str(tmp_path / "data.txt")), None)


def test_nested_fields_are_flattened(tmp_path):
    nested = tmp_path / "nested.jsonl"
    nested.write_text(json.dumps({"item": {"question": "2+2=", "gold": {"value": "4"}}}) + "\n")
    rows = load_eval_rows(parse_data_spec(f"{nested},prompt=item.question,answer=item.gold.value"), None)
    assert (rows[0]["prompt"], rows[0]["answer"]) == ("2+2=", "4")


# ----------------------------------------------------------------------------------------------- the CLI


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("args, message", [
    (["evaluate", "runs/none/here", "--data", "task:arithmetic"], "model: the directory runs/none/here does not exist"),
    (["evaluate", "tiny", "--k", "8", "--samples", "4"], "--k (8) is larger than the samples per prompt (4)"),
    (["evaluate", "tiny", "--data", "task:nosuch"], "data.task: Unknown task 'nosuch'"),
])
def test_cli_errors_are_one_line_with_exit_code_2(args, message, capsys):
    code, out, err = run_cli(args, capsys)
    assert code == 2
    assert err.startswith("rlvr-entropy: error:") and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_cli_names_the_bad_data_file(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"\xff\xfe\x00garbage\x00\n\x01")
    code, _, err = run_cli(["evaluate", "tiny", "--data", str(bad)], capsys)
    assert code == 2 and f"{bad}: cannot read it as CSV" in err, err
    assert "Traceback" not in err


def test_cli_evaluates_the_tiny_model_with_json_and_samples(tiny_model_path, tmp_path, capsys):
    out_json = tmp_path / "eval.json"
    code, out, err = run_cli(["evaluate", "tiny", "--data", "task:arithmetic", "--k", "4", "--num-prompts", "24",
                              "--temperature", "1.0", "--json", str(out_json), "--save-samples", "--no-progress"], capsys)
    assert code == 0, err
    header, row = out.splitlines()[:2]
    assert header.split()[-7:] == ["pass@1", "pass@2", "pass@4", "maj@4", "entropy", "length", "truncated"]
    assert row.startswith("tiny") and "24 x 4" in row
    payload = json.loads(out_json.read_text())
    result = payload["results"][0]
    assert result["dataset"] == "arithmetic" and len(result["prompts"]) == 24
    samples = [s for p in result["prompts"] for s in p["samples"]]
    assert len(samples) == 96 and {"completion", "extracted", "correct", "tokens", "truncated"} <= set(samples[0])
    assert result["figures"]["pass@1"] == pytest.approx(sum(s["correct"] for s in samples) / 96)
    # the same seed gives the same samples
    code, again, _ = run_cli(["evaluate", "tiny", "--k", "4", "--num-prompts", "24", "--temperature", "1.0",
                              "--no-progress"], capsys)
    assert again.splitlines()[1] == row


def test_generation_entropy_equals_the_training_pass_entropy_of_the_same_tokens(tiny_model_path):
    """The sampled responses' entropy (from generate's own forward calls) is the training forward's, within 1e-4."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlvr_entropy.evaluation import HFSampler, tokenize_prompts
    from rlvr_entropy.rollout_stats import forward_inputs
    from rlvr_entropy.tasks import make_dataset

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    temperature = 0.7
    prompts = list(make_dataset("arithmetic", 6, seed=5, split="eval")["prompt"])
    drawn = HFSampler(model, tokenizer, temperature)(prompts, 3, seed=11, max_new_tokens=8)
    prompt_ids = [p for p in tokenize_prompts(tokenizer, prompts) for _ in range(3)]
    samples = [s for row in drawn for s in row]
    ids, attention, width = forward_inputs(prompt_ids, [s.token_ids for s in samples], tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, -width - 1:-1].float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    exact = -(logp.exp() * logp).sum(-1)  # (B, width)
    for i, s in enumerate(samples):
        n = len(s.token_ids)
        assert n >= 1 and s.entropy.shape == (n,)
        assert torch.allclose(s.entropy, exact[i, :n], atol=1e-4), (s.entropy, exact[i, :n])
    again = HFSampler(model, tokenizer, temperature)(prompts, 3, seed=11, max_new_tokens=8)
    assert [s.token_ids for row in again for s in row] == [s.token_ids for s in samples]  # seeded



def test_a_run_directory_resolves_to_its_final_model_else_its_latest_checkpoint(tmp_path):
    from rlvr_entropy.runner import model_directory

    run = tmp_path / "run"
    for step in (2, 10, 9):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "config.json").write_text("{}")
    (run / "checkpoint-11").mkdir()  # being written: no config.json yet
    assert model_directory(str(run)) == str(run / "checkpoint-10")
    (run / "config.json").write_text("{}")
    assert model_directory(str(run)) == str(run)  # the final model, saved at the end of training
    assert model_directory(str(run / "checkpoint-2")) == str(run / "checkpoint-2")
    assert model_directory("Qwen/Qwen2.5-Math-7B") == "Qwen/Qwen2.5-Math-7B"  # a hub id, left to transformers
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match="holds no model"):
        model_directory(str(tmp_path / "empty"))
    with pytest.raises(RecipeError, match="does not exist"):
        model_directory(str(tmp_path / "none" / "deeper"))


def test_rows_without_an_answer_are_skipped_and_counted(tmp_path, caplog):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in [
        {"q": "1+1=", "a": "2"}, {"q": "2+2=", "a": None}, {"q": "  ", "a": "5"}, {"q": "3+3=", "a": "6"}]))
    with caplog.at_level("WARNING"):
        kept = load_eval_rows(parse_data_spec(f"{rows},prompt=q,answer=a"), None)
    assert list(kept["prompt"]) == ["1+1=", "3+3="]
    assert "skipping 2 of 4 rows" in caplog.text
    none = tmp_path / "none.jsonl"
    none.write_text(json.dumps({"q": "1+1=", "a": ""}) + "\n")
    with pytest.raises(RecipeError, match="no row can be evaluated"):
        load_eval_rows(parse_data_spec(f"{none},prompt=q,answer=a"), None)
