"""Hook composition with toy methods: list order, state keyed by name, token terms, errors."""

from dataclasses import dataclass

import pytest
import torch

from rlvr_entropy.config import build_method
from rlvr_entropy.methods import (
    LossBatch,
    Method,
    MethodConfigError,
    NonFiniteError,
    Pipeline,
    Rollout,
    RolloutBatch,
    RolloutContext,
    TokenTerms,
)


@dataclass
class AddOne(Method):
    name = "add_one"
    amount: float = 1.0

    def init_state(self):
        return {"calls": 0}

    def advantage(self, advantages, batch):
        self.state["calls"] += 1
        return advantages + self.amount


@dataclass
class Double(Method):
    name = "double"

    def advantage(self, advantages, batch):
        return advantages * 2


@dataclass
class Bonus(Method):
    name = "bonus"
    value: float = 0.5

    def reward(self, rewards, batch):
        return rewards + self.value


@dataclass
class Halve(Method):
    name = "halve"

    def reward(self, rewards, batch):
        return rewards / 2


@dataclass
class WeightHalf(Method):
    name = "weight_half"
    seen: list | None = None

    def token_loss(self, batch):
        self.seen = batch.weight.clone()
        return TokenTerms(weight=torch.full_like(batch.mask, 0.5), detach=batch.advantages > 0)


@dataclass
class WeightThird(Method):
    name = "weight_third"
    seen: list | None = None

    def token_loss(self, batch):
        self.seen = batch.weight.clone()
        return TokenTerms(weight=torch.full_like(batch.mask, 1 / 3), detach=batch.advantages < -1, extra=batch.logps * 2)


def rollout_batch(n=4, t=3):
    return RolloutBatch(
        rewards_per_func=torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]),
        reward_names=["a", "b"],
        reward_weights=torch.tensor([1.0, 2.0]),
        group_ids=torch.tensor([0, 0, 1, 1]),
        group_size=2,
        mask=torch.ones(n, t),
        completion_ids=torch.zeros(n, t, dtype=torch.long),
        step=0,
        training=True,
    )


def loss_batch():
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], requires_grad=True)
    return LossBatch(
        logps=logps, old_logps=logps.detach(), on_policy=True, entropy=torch.ones(2, 2),
        advantages=torch.tensor([[1.0, 1.0], [-2.0, -2.0]]), mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
        group_ids=torch.tensor([0, 0]), weight=torch.ones(2, 2), loss_type="dapo", epsilon_low=0.2,
        epsilon_high=0.2, importance_sampling_level="token", step=3, micro_step=1, seed=0, process_index=0,
        num_processes=1, gather=lambda x: x,
    )


def test_empty_pipeline_is_identity():
    p = Pipeline([])
    adv = torch.tensor([1.0, -1.0])
    assert torch.equal(p.advantage(adv, rollout_batch()), adv)
    assert p.reward(rollout_batch()) == {}
    terms = p.token_loss(loss_batch())
    assert terms.weight is None and terms.detach is None and terms.extra is None
    assert p.state_dict() == {} and p.needs == frozenset()


def test_advantage_order_matters():
    adv = torch.tensor([1.0, -1.0, 0.5, 0.0])
    ab = Pipeline([AddOne(), Double()]).advantage(adv, rollout_batch())
    ba = Pipeline([Double(), AddOne()]).advantage(adv, rollout_batch())
    assert torch.equal(ab, (adv + 1) * 2)
    assert torch.equal(ba, adv * 2 + 1)


def test_reward_hooks_fold_left_and_report_columns():
    batch = rollout_batch()
    base = torch.tensor([1.0, 2.0, 3.0, 0.0])  # weighted sum a + 2b
    assert torch.equal(batch.weighted_rewards(), base)
    cols = Pipeline([Bonus(), Halve()]).reward(batch)
    assert torch.allclose(cols["bonus"], torch.full((4,), 0.5))
    assert torch.allclose(cols["halve"], -(base + 0.5) / 2)
    # summing TRL's columns gives the composed reward
    assert torch.allclose(base + cols["bonus"] + cols["halve"], (base + 0.5) / 2)
    cols_rev = Pipeline([Halve(), Bonus()]).reward(rollout_batch())
    assert torch.allclose(base + cols_rev["halve"] + cols_rev["bonus"], base / 2 + 0.5)


def test_all_nan_reward_rows_stay_nan_without_error():
    batch = rollout_batch()
    batch.rewards_per_func[3] = float("nan")
    cols = Pipeline([Bonus()]).reward(batch)
    assert torch.isnan(cols["bonus"][3]) and torch.isfinite(cols["bonus"][:3]).all()


def test_token_terms_compose():
    first, second = WeightHalf(), WeightThird()
    batch = loss_batch()
    terms = Pipeline([first, second]).token_loss(batch)
    assert torch.equal(first.seen, torch.ones(2, 2))
    assert torch.allclose(second.seen, torch.full((2, 2), 0.5))  # sees the earlier weights
    assert torch.allclose(terms.weight, torch.full((2, 2), 0.5 / 3))
    assert torch.equal(terms.detach, torch.tensor([[True, True], [True, True]]))
    assert torch.allclose(terms.extra, batch.logps * 2) and terms.extra.requires_grad


def test_state_is_keyed_by_name_and_round_trips():
    p = Pipeline([AddOne(), Double()])
    p.advantage(torch.zeros(4), rollout_batch())
    p.advantage(torch.zeros(4), rollout_batch())
    state = p.state_dict()
    assert state == {"add_one": {"calls": 2}, "double": {}}
    q = Pipeline([AddOne(), Double()])
    q.load_state_dict(state)
    assert q.methods[0].state == {"calls": 2}
    with pytest.raises(ValueError, match="missing"):
        Pipeline([AddOne(), Bonus()]).load_state_dict(state)


def test_snapshot_is_a_value_that_restore_returns_to():
    p = Pipeline([AddOne(), Double()])
    p.advantage(torch.zeros(4), rollout_batch())
    snap = p.snapshot()
    p.advantage(torch.zeros(4), rollout_batch())
    p.methods[0].state["extra"] = [1]
    assert snap == {"add_one": {"calls": 1}, "double": {}}  # later changes do not reach the snapshot
    p.restore(snap)
    assert p.state_dict() == snap
    p.methods[0].state["calls"] += 5
    assert snap["add_one"]["calls"] == 1  # nor does mutating the restored state


def test_duplicate_methods_rejected():
    with pytest.raises(MethodConfigError, match="twice"):
        Pipeline([AddOne(), AddOne(amount=2.0)])


def test_non_finite_output_names_the_method():
    @dataclass
    class Broken(Method):
        name = "broken"

        def advantage(self, advantages, batch):
            return advantages / 0.0

    with pytest.raises(NonFiniteError, match="'broken'.*advantage"):
        Pipeline([Broken()]).advantage(torch.tensor([1.0, 0.0, 2.0, 3.0]), rollout_batch())


def test_negative_weights_rejected():
    @dataclass
    class Negative(Method):
        name = "negative"

        def token_loss(self, batch):
            return TokenTerms(weight=-torch.ones_like(batch.mask))

    with pytest.raises(ValueError, match="negative"):
        Pipeline([Negative()]).token_loss(loss_batch())


def test_rollout_hooks_wrap_in_list_order():
    calls = []

    @dataclass
    class Outer(Method):
        name = "outer"

        def rollout(self, ctx, generate):
            calls.append("outer")
            out = generate(None, None)
            hot = generate([1], 2.0)  # regenerate row 1 at another temperature
            return out.replace_rows([1], hot)

    @dataclass
    class Inner(Method):
        name = "inner"

        def rollout(self, ctx, generate):
            calls.append("inner")
            return generate(None, None)

    def base(rows, temperature):
        rows = list(range(2)) if rows is None else rows
        t = temperature or 1.0
        return Rollout([[r, int(t * 10)] for r in rows], None, {"entropy": [torch.tensor([t, t]) for _ in rows]})

    ctx = RolloutContext(prompt_ids=[[5], [5]], group_size=2, temperature=1.0, step=0, training=True,
                         generator=torch.Generator())
    out = Pipeline([Outer(), Inner()]).rollout(ctx, base)
    assert calls == ["outer", "inner"]
    assert out.completion_ids == [[0, 10], [1, 20]]
    assert torch.equal(out.stats["entropy"][1], torch.tensor([2.0, 2.0]))


def test_build_method_validates_parameters():
    with pytest.raises(MethodConfigError, match="Did you mean 'coef'"):
        build_method({"name": "entropy_bonus", "coeff": 0.1})
    with pytest.raises(MethodConfigError, match="expected a number"):
        build_method({"name": "entropy_bonus", "coef": "big"})
    with pytest.raises(MethodConfigError, match="needs a `name`"):
        build_method({"coef": 0.1})
    m = build_method({"name": "entropy_bonus", "coef": 1})  # ints widen to floats
    assert m.coef == 1.0 and isinstance(m.coef, float)


def test_loss_batch_generator_is_reproducible_and_scoped():
    b = loss_batch()
    a1 = torch.rand(3, generator=b.generator())
    a2 = torch.rand(3, generator=b.generator())
    assert torch.equal(a1, a2)
    b.micro_step = 2
    assert not torch.equal(a1, torch.rand(3, generator=b.generator()))
    b.micro_step = 1
    b.process_index = 1
    assert torch.equal(a1, torch.rand(3, generator=b.generator()))  # global by default
    assert not torch.equal(a1, torch.rand(3, generator=b.generator(per_process=True)))


def test_ppo_clipped_matches_trl_definition():
    b = loss_batch()
    b.old_logps = b.logps.detach() + torch.tensor([[0.5, 0.0], [-0.5, -0.5]])
    # row 0: ratio exp(-0.5)=0.61 with A>0 -> not clipped (low side only clips A<0); row 1: ratio 1.65, A<0 -> no
    assert not b.ppo_clipped().any()
    b.old_logps = b.logps.detach() + torch.tensor([[-0.5, 0.0], [0.5, 0.5]])
    # row 0 col 0: ratio 1.65 > 1.2 with A>0 -> clipped; row 1: ratio 0.61 < 0.8 with A<0 -> clipped (col 1 is padding)
    assert torch.equal(b.ppo_clipped(), torch.tensor([[True, False], [True, False]]))
