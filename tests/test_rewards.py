"""Reward functions: answer extraction, correctness (incl. math-verify fallback), registry lookup."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from rlvr_entropy.tasks import REWARDS, correctness, extract_answer, format_reward, get_reward
from rlvr_entropy.tasks.rewards import reference_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("81", "81"),
        ("  -35 \n", "-35"),
        ("\\boxed{81}", "81"),
        ("so \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # last box, nested braces
        ("<answer> 42 </answer>", "42"),
        ("<answer>1</answer> <answer>2</answer>", "2"),
        ("<think>\\boxed{7}</think>12", "12"),  # reasoning never counts as the answer
        ("\\frac{1}{2}", "\\frac{1}{2}"),
        ("(2+3)*4", "(2+3)*4"),
        ("the answer is 81", None),
        ("\\boxed{12", None),  # cut off before the box closed
        ("<answer>12", None),
        ("\\boxed{}", None),
        ("", None),
        ("   ", None),
        (None, None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_correctness_known_answers():
    completions = ["81", "80", "\\boxed{81}", "<answer>81</answer>", "81 is it", "", "081"]
    assert correctness(["23+58="] * 7, completions, answer=["81"] * 7) == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("predicted", ["1/2", "0.5", "\\frac{1}{2}", "\\boxed{\\frac{1}{2}}", "0.50", "\\dfrac{1}{2}"])
@pytest.mark.parametrize("reference", ["1/2", "0.5", "\\frac{1}{2}"])
def test_equivalent_forms_of_one_half(predicted, reference):
    assert correctness(["p"], [predicted], answer=[reference]) == [1.0]


@pytest.mark.parametrize("predicted", ["1/3", "0.6", "\\frac{2}{3}", "-1/2", "2"])
def test_wrong_values_score_zero(predicted):
    assert correctness(["p"], [predicted], answer=["1/2"]) == [0.0]


def test_missing_references_and_conversational_completions():
    assert correctness(["p", "p"], ["3", "3"], answer=["3", None]) == [1.0, None]
    conversational = [[{"role": "assistant", "content": "\\boxed{3}"}]]
    assert correctness(["p"], conversational, answer=["3"]) == [1.0]
    with pytest.raises(ValueError, match="answer"):
        correctness(["p"], ["3"])


def test_runs_off_the_main_thread_and_never_hangs():
    """math-verify's signal timeouts are disabled, so threads work; the guard stops runaway powers."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda c: correctness(["p"], [c], answer=["\\frac{1}{2}"])[0], ["0.5", "9^9^9^9"]))
    assert results == [1.0, 0.0]
    assert time.perf_counter() - started < 10


def test_format_reward():
    completions = ["81", " 81\n", "-3", "1/2", "81 is the answer", "\\boxed{81}", "", "abc"]
    assert format_reward(["p"] * 8, completions) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_get_reward_by_name_and_import_path():
    assert get_reward("correctness") is correctness
    assert get_reward("format") is format_reward is REWARDS.get("format")
    assert get_reward("rlvr_entropy.tasks.rewards:correctness") is correctness
    assert get_reward("rlvr_entropy.tasks.rewards.format_reward") is format_reward


def test_get_reward_errors():
    with pytest.raises(ValueError, match="Did you mean 'correctness'") as error:
        get_reward("corectness")
    assert "format" in str(error.value)
    with pytest.raises(ValueError, match="cannot import"):
        get_reward("rlvr_entropy.tasks.rewards:no_such_reward")
    with pytest.raises(ValueError, match="cannot import"):
        get_reward("no_such_package.module:function")
    with pytest.raises(ValueError, match="not callable"):
        get_reward("rlvr_entropy.tasks.rewards:REWARDS")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("47+30=77 77+8=85</think>85", "85"),
        ("47+30=77 77+8=85</think>86", "86"),  # the thinking's 85 is not the answer
        ("</think>85", "85"),  # empty thinking
        ("47+30=77 77+8=85 47+38=85</think> 85 ", "85"),
        ("47+30=77 77+8=85</think>", None),  # thinking, marker, no answer
        ("47+30=77 77+8=85", None),  # cut off (or stopped) before the marker: thinking is no answer
        ("47+30", "47+30"),  # ... unless it is a bare expression, the rule of the bare-answer tasks
        ("85", "85"),  # no thinking and no marker: a bare answer still answers
        ("47+30=77</think>85</think>86", "86"),  # the last marker ends the reasoning
    ],
)
def test_extract_answer_after_the_think_marker(text, expected):
    assert extract_answer(text) == expected


def test_correctness_scores_think_completions_by_the_answer_after_the_marker():
    completions = ["47+30=77 77+8=85</think>85", "47+30=77 77+8=85</think>84", "</think>85", "47+30=77 77+8=85", ""]
    assert correctness(["47+38="] * 5, completions, answer=["85"] * 5) == [1.0, 0.0, 1.0, 0.0, 0.0]


GSM8K_REFERENCE = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)


def test_gsm8k_reference_is_the_number_after_the_hashes():
    assert reference_answer(GSM8K_REFERENCE) == "72"
    assert reference_answer("72") == "72" and reference_answer("\\frac{1}{2}") == "\\frac{1}{2}"
    completions = ["\\boxed{72}", "<think>48+24=72</think>\n\nThe answer is \\boxed{72}.", "#### 72", "72",
                   "\\boxed{24}", "\\boxed{48}", "#### 2"]
    assert correctness(["q"] * 7, completions, answer=[GSM8K_REFERENCE] * 7) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert correctness(["q"], ["\\boxed{1000}"], answer=["so 1,000 in all.\n#### 1,000"]) == [1.0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold 24 + 48 = 72 clips.\n#### 72", "72"),  # GSM8K's own answer format
        ("<think>so #### 5</think>\nShe sold 72.\n#### 72\n", "72"),
        ("#### 70\nwait, #### 72", "72"),  # the last one
        ("####", None),
        ("\\boxed{72}\n#### 70", "72"),  # a box takes precedence
    ],
)
def test_extract_gsm8k_hash_answer(text, expected):
    assert extract_answer(text) == expected


def test_integer_expressions_take_the_exact_path_and_agree_with_math_verify(monkeypatch):
    """Sums of integer products (the split task's answers) are compared exactly, with math-verify's verdicts."""
    import random

    from math_verify import parse, verify

    import rlvr_entropy.tasks.rewards as rewards

    assert rewards.integer_value("-3+4*5-6") == 11 and rewards.integer_value("007+1") == 8
    rng = random.Random(0)
    cases = [("23+34", "57"), ("23+35", "57"), ("57", "0+57"), ("2*3+1", "7"), ("-5+62", "57"), ("10-3*2", "4"),
             ("99999999999999999999+1", "100000000000000000000"), ("1+2+3+4", "10"), ("4*5", "21")]
    for _ in range(40):
        n = rng.randint(0, 200)
        a = rng.randint(0, n)
        cases.append((f"{a}+{n - a + rng.choice([0, 0, 1, -1])}", str(n)))
    expected = [bool(verify(parse(f"${r}$", parsing_timeout=None), parse(f"${p}$", parsing_timeout=None),
                            timeout_seconds=None)) for p, r in cases]
    assert sum(expected) not in (0, len(cases))   # both verdicts occur
    monkeypatch.setattr(rewards, "parse", lambda *a, **k: pytest.fail("math-verify called for an integer expression"))
    assert [rewards.answers_match(p, r) for p, r in cases] == expected
