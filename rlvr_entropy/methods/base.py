"""The method interface: what an entropy-control method may read and change, and how methods compose.

A method is a small dataclass whose fields are its YAML parameters. Every hook is the identity by
default; a method overrides the one or two it needs. :class:`Pipeline` chains the methods of a
recipe in list order and is the only thing the trainer talks to, so the trainer never branches on
a method's name. The order in which the trainer calls the hooks is written once, in
``rlvr_entropy/trainer.py``. Building a method from a recipe entry (names and YAML types of its
parameters) is the recipe layer's job: ``rlvr_entropy.config.build_method``.

Shapes: ``N`` = samples of the whole generation batch on all processes, ``B`` = samples of one
loss micro-batch on this process, ``T`` = completion tokens (right-padded), ``K`` = reward
functions, ``G`` = generations per prompt.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from rlvr_entropy.registry import Registry, closest
from rlvr_entropy.tensor_ops import grpo_advantages, stable_hash

#: Rollout statistics a method can declare in ``needs``; the trainer computes only the union.
#: - ``entropy``: behaviour-policy token entropy at each completion position (N, T)
#: - ``logps``:   behaviour-policy log-prob of each sampled token (N, T); sums give sequence log-likelihoods
#: - ``answers``: final answer extracted from each decoded completion (list of str | None)
#: - ``phases``:  index of the first thinking-end marker in each completion, -1 if absent (N,)
ROLLOUT_STATS = frozenset({"entropy", "logps", "answers", "phases"})

#: Loss-time inputs a method can declare in ``loss_needs``:
#: - ``ref_logps``: reference-model log-probs of the completion tokens (``LossBatch.ref_logps``), computed once per
#:   generation batch as TRL does for ``beta > 0`` (TRL's own are reused when ``beta != 0``).
LOSS_INPUTS = frozenset({"ref_logps"})

#: TRL trainer settings a method may drive from ``trl_settings`` (set before each optimizer step):
#: ``entropy_coef`` (TRL's entropy-bonus coefficient) and ``entropy_target`` (its adaptive controller's target).
TRL_SETTINGS = frozenset({"entropy_coef", "entropy_target"})

HOOKS = ("configure", "trl_settings", "rollout", "reward", "advantage", "logit_stat", "token_loss")

METHODS: Registry[type[Method]] = Registry("method")


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: ``@register("clip_cov")`` makes the method selectable from YAML by that name."""
    return METHODS.register(name)


class MethodConfigError(ValueError):
    """A method entry in a recipe is malformed (unknown method, unknown or mistyped parameter, bad range)."""


def clipped_sides(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, eps_low: float | Tensor,
                  eps_high: float | Tensor) -> tuple[Tensor, Tensor]:
    """PPO's clipped tokens, split by side: (low, high), each (B, T) bool; TRL's ``clip_ratio`` definition.

    low: ratio < 1 - eps_low with A < 0; high: ratio > 1 + eps_high with A > 0 (the clip term is the active one,
    so the token's policy gradient is 0). Padding is never clipped.
    """
    ratio = torch.exp(logps.detach() - old_logps)  # (B, T)
    valid = mask > 0
    low = (ratio < 1 - eps_low) & (advantages < 0) & valid
    high = (ratio > 1 + eps_high) & (advantages > 0) & valid
    return low, high


def updates_on_policy_only(args: Any) -> bool:
    """Whether every optimizer step of a run with TRL config ``args`` is the first update after its rollout (one
    optimizer step per generation batch, one iteration): old log-probs then equal the current ones, so a method that
    acts on the ratio or on the change since the rollout does nothing."""
    return args.num_iterations == 1 and args.steps_per_generation <= args.gradient_accumulation_steps


# ----------------------------------------------------------------------------------------------------------
# What the hooks see


def _identity(x: Tensor) -> Tensor:
    return x


class _MethodScope:
    """Keys what a hook logs, tags or carries by the method it runs for: ``<method>/<name>``.

    The pipeline enters ``scope(method.name)`` around each hook; a test calling a hook directly does too.
    """

    _prefix: str

    @contextlib.contextmanager
    def scope(self, method: str) -> Iterator[None]:
        saved, self._prefix = self._prefix, f"{method}/"
        try:
            yield
        finally:
            self._prefix = saved

    def key(self, name: str) -> str:
        """``<method>/<name>`` for the method whose hook is running (``name`` alone outside any scope)."""
        return f"{self._prefix}{name}"


@dataclass
class Rollout:
    """Completions for the rows of one ``_generate_single_turn`` call, plus per-row rollout statistics.

    ``stats[name][i]`` is a 1-D float32 tensor with one value per completion token of row ``i``.
    ``tags[name]`` is a (B,) float32 tensor a rollout hook attaches to its rows (``RolloutContext.tag``);
    the trainer gathers it for the reward and advantage hooks (``RolloutBatch.tag``).
    """

    completion_ids: list[list[int]]
    logprobs: list[list[float]] | None = None
    stats: dict[str, list[Tensor]] = field(default_factory=dict)
    tags: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.completion_ids)

    def select(self, rows: list[int]) -> Rollout:
        """The listed rows, in that order, with their log-probs, statistics and tags."""
        logprobs = None if self.logprobs is None else [self.logprobs[j] for j in rows]
        stats = {k: [v[j] for j in rows] for k, v in self.stats.items()}
        tags = {k: v[rows] for k, v in self.tags.items()}
        return Rollout([self.completion_ids[j] for j in rows], logprobs, stats, tags)

    def replace_rows(self, rows: list[int], other: Rollout) -> Rollout:
        """Return a copy where row ``rows[j]`` is taken from row ``j`` of ``other``.

        Both rollouts must carry the same statistics (they come from the same trainer), and the
        caller is responsible for ``other[j]`` answering the same prompt as ``self[rows[j]]``.
        """
        if len(rows) != len(other):
            raise ValueError(f"replace_rows got {len(rows)} rows but {len(other)} completions")
        ids = list(self.completion_ids)
        logprobs = None if self.logprobs is None or other.logprobs is None else list(self.logprobs)
        stats = {k: list(v) for k, v in self.stats.items()}
        tags = {k: v.clone() for k, v in self.tags.items()}
        for j, i in enumerate(rows):
            ids[i] = other.completion_ids[j]
            if logprobs is not None:
                logprobs[i] = other.logprobs[j]  # type: ignore[index]
            for k in stats:
                stats[k][i] = other.stats[k][j]
            for k in tags:
                tags[k][i] = other.tags[k][j] if k in other.tags else 0.0
        return Rollout(ids, logprobs, stats, tags)


#: ``generate(rows, temperature)`` samples completions for the given rows of the current batch
#: (all rows if None) at the given temperature (the configured one if None).
GenerateFn = Callable[[list[int] | None, float | None], Rollout]

#: ``score(rows, rollout)`` runs the user reward functions on ``rollout`` (one completion per listed
#: row of the current batch) and returns their weighted sum, (len(rows),) float32, NaN where no
#: function gave a reward. Every process must call it, with the same number of rows.
ScoreFn = Callable[[list[int], Rollout], Tensor]


@dataclass
class RolloutContext(_MethodScope):
    """What a rollout hook knows about the batch being generated (this process's rows only)."""

    prompt_ids: list[list[int]]  # one entry per row, prompts already repeated G times
    group_size: int
    temperature: float
    step: int
    training: bool
    generator: torch.Generator  # seeded from (seed, step, process): draws repeat across runs
    process_index: int = 0  # row i here is row process_index * len(prompt_ids) + i of the global batch
    num_processes: int = 1
    score: ScoreFn | None = None  # the trainer's reward functions, for hooks that filter what they sample
    metrics: dict[str, float] = field(default_factory=dict)
    _prefix: str = field(default="", repr=False)

    def log(self, name: str, value: float) -> None:
        """Log ``<method>/<name>``; the value must already be global (equal on every process)."""
        self.metrics[self.key(name)] = float(value)

    def global_rows(self) -> Tensor:
        """Index of each local row in the gathered batch, (B,) long; ``// group_size`` gives its group."""
        start = self.process_index * len(self.prompt_ids)
        return torch.arange(start, start + len(self.prompt_ids))

    def tag(self, rollout: Rollout, name: str, values: Tensor) -> None:
        """Attach a per-row value, (B,), that this method's reward/advantage hooks read with ``batch.tag(name)``."""
        if values.shape != (len(rollout),):
            raise ValueError(f"tag('{name}') needs one value per row ({len(rollout)}), got {tuple(values.shape)}")
        rollout.tags[self.key(name)] = values.detach().float().cpu()


@dataclass
class RolloutBatch(_MethodScope):
    """The whole generation batch, gathered from every process, as the reward and advantage hooks see it.

    Samples ``i`` with equal ``group_ids[i]`` answer the same prompt. Tensors are float32 on the
    training device; padding positions (``mask == 0``) hold zeros and must not be read.
    """

    rewards_per_func: Tensor  # (N, K) user reward functions, NaN where a function gave no reward
    reward_names: list[str]
    reward_weights: Tensor  # (K,)
    group_ids: Tensor  # (N,) long
    group_size: int
    mask: Tensor  # (N, T) 1.0 = generated token that counts
    completion_ids: Tensor  # (N, T) long
    step: int
    training: bool
    rewards: Tensor | None = None  # (N,) final scalar rewards (after reward hooks), set for advantage hooks
    completions: list[str] | None = None  # decoded completions (only when ``answers`` is needed)
    entropy: Tensor | None = None  # (N, T) behaviour-policy token entropy
    logps: Tensor | None = None  # (N, T) behaviour-policy log-prob of the sampled tokens
    answers: list[str | None] | None = None
    phases: Tensor | None = None  # (N,) position of the first thinking-end marker, -1 if absent
    marker_length: int = 0  # tokens in the thinking-end marker (it can be split into several)
    seed: int = 0
    scale_rewards: str = "group"  # TRL's setting, for ``grpo_advantages``
    encode: Callable[[str], list[int]] | None = None  # the tokenizer, text -> ids without special tokens
    tags: dict[str, Tensor] = field(default_factory=dict)  # (N,) each, from rollout hooks (``RolloutContext.tag``)
    metrics: dict[str, float] = field(default_factory=dict)
    carried: dict[str, Tensor] = field(default_factory=dict)
    _prefix: str = field(default="", repr=False)

    def tag(self, name: str) -> Tensor:
        """What this method's rollout hook attached to each row with ``ctx.tag(rollout, name, ...)``, (N,)."""
        key = self.key(name)
        if key not in self.tags:
            raise KeyError(f"no rollout tag '{key}': the method's rollout hook must call ctx.tag(rollout, '{name}', ...)")
        return self.tags[key]

    def grpo_advantages(self, rewards: Tensor) -> Tensor:
        """TRL's group advantages of ``rewards`` (N,) under this run's ``scale_rewards``; NaN rewards are
        left out of their group's baseline and get advantage 0 (TRL's rule for unscorable samples)."""
        return grpo_advantages(rewards, self.group_size, self.scale_rewards)

    def generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator seeded from (seed, step, salt): identical on every process, so draws over
        the gathered batch agree everywhere and repeat across runs."""
        return torch.Generator().manual_seed(stable_hash((self.seed, self.step, salt, int(self.training))))

    @property
    def lengths(self) -> Tensor:
        return self.mask.sum(dim=1)  # (N,)

    def weighted_rewards(self) -> Tensor:
        """TRL's scalar reward: the weighted sum of the reward functions, NaN where all of them are NaN."""
        r = (self.rewards_per_func * self.reward_weights.unsqueeze(0)).nansum(dim=1)  # (N,)
        return r.masked_fill(torch.isnan(self.rewards_per_func).all(dim=1), float("nan"))

    def total_rewards(self) -> Tensor:
        """The scalar reward TRL's advantages come from: user rewards plus method reward columns, (N,)."""
        return self.rewards if self.rewards is not None else self.weighted_rewards()

    def reward_column(self, name: str) -> Tensor:
        """The rewards of one named reward function, (N,)."""
        if name not in self.reward_names:
            raise KeyError(f"no reward function named '{name}'.{closest(name, self.reward_names)}")
        return self.rewards_per_func[:, self.reward_names.index(name)]

    def sequence_logp(self, normalize: bool = False) -> Tensor:
        """Behaviour-policy log-likelihood of each completion, summed (or averaged) over its tokens, (N,)."""
        if self.logps is None:
            raise RuntimeError("sequence_logp needs the 'logps' rollout statistic: add it to the method's `needs`")
        total = (self.logps * self.mask).sum(dim=1)
        return total / self.lengths.clamp(min=1.0) if normalize else total

    def mean_entropy(self) -> Tensor:
        """Masked mean behaviour-policy entropy of each completion, (N,); 0 for an empty completion."""
        if self.entropy is None:
            raise RuntimeError("mean_entropy needs the 'entropy' rollout statistic: add it to the method's `needs`")
        return (self.entropy * self.mask).sum(dim=1) / self.lengths.clamp(min=1.0)

    def log(self, name: str, value: float | Tensor) -> None:
        """Log a statistic as ``<method>/<name>`` (values are global already: no reduction needed)."""
        self.metrics[self.key(name)] = float(value)

    def carry(self, name: str, value: Tensor) -> None:
        """Hand a per-sample (N, ...) or per-token (N, T) tensor to this method's ``token_loss``.

        Each process keeps its own rows; the tensor then follows TRL's shuffling and splitting, and
        the loss hook reads it with ``LossBatch.carried_value(name)``.
        """
        if value.dim() == 0 or value.size(0) != self.mask.size(0):
            raise ValueError(f"carry('{name}') needs one row per sample ({self.mask.size(0)}), got {tuple(value.shape)}")
        self.carried[self.key(name)] = value.detach()


@dataclass
class LossBatch(_MethodScope):
    """One loss micro-batch on this process, as the token-level hook sees it.

    ``logps`` and ``entropy`` carry gradients (they come from the single training forward pass);
    everything else is detached. ``weight`` is the product of the weights returned by the methods
    listed before this one.
    """

    logps: Tensor  # (B, T) current policy, with grad
    old_logps: Tensor  # (B, T) behaviour policy (equals logps.detach() when on_policy)
    on_policy: bool  # no optimizer step since the rollout: old_logps == logps.detach()
    entropy: Tensor  # (B, T) training-pass entropy at the training temperature, with grad
    advantages: Tensor  # (B, T)
    mask: Tensor  # (B, T) float, 1.0 = token that counts in the loss
    group_ids: Tensor  # (B,) long, global prompt index
    weight: Tensor  # (B, T)
    loss_type: str
    epsilon_low: float
    epsilon_high: float
    importance_sampling_level: str
    step: int
    micro_step: int
    seed: int
    process_index: int
    num_processes: int
    gather: Callable[[Tensor], Tensor]  # pads dim 1 across processes, then concatenates along dim 0
    reduce_sum: Callable[[Tensor], Tensor] = _identity  # sums a tensor over processes (identity on one)
    training: bool = True  # False under trainer.evaluate(): controllers must not update their state then
    accumulation_steps: int = 1  # loss micro-batches per optimizer step on each process (1 under evaluate())
    rollout_entropy: Tensor | None = None  # (B, T) when some method needs rollout entropy
    rollout_logps: Tensor | None = None  # (B, T) when some method needs rollout log-probs
    ref_logps: Tensor | None = None  # (B, T) reference-model log-probs, present when TRL's beta != 0
    kl_coef: float = 0.0  # TRL's beta: its loss already holds beta * kl() per token
    bias_correction_kl: bool = False  # TRL's use_bias_correction_kl
    carried: dict[str, Tensor] = field(default_factory=dict)  # from RolloutBatch.carry, this micro-batch's rows
    logit_stats: dict[str, Tensor] = field(default_factory=dict)  # <method>/logit_stat -> (B, T), with grad
    metrics: dict[str, tuple[Tensor, str, Tensor]] = field(default_factory=dict)  # (value, reduce, count)
    _prefix: str = field(default="", repr=False)

    def logit_stat(self) -> Tensor:
        """This method's ``Method.logit_stat`` at every completion position of the training forward, (B, T) float32
        with gradient; 0 at positions that do not count."""
        key = self.key("logit_stat")
        if key not in self.logit_stats:
            raise KeyError(f"no '{key}': the method must override Method.logit_stat")
        return self.logit_stats[key]

    def global_sum_count(self, values: Tensor, subset: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Sum of ``values`` over the counted items of ``subset`` and their number, both summed over every process's
        micro-batch: detached float32 scalars, equal on every process. Items are tokens for (B, T) ``values`` (counted:
        ``mask``, times ``subset`` if given) and rows for (B,) ``values`` (counted: all rows, or ``subset`` (B,))."""
        m = self._counted(values, subset)
        totals = self.reduce_sum(torch.stack([(values.detach().float() * m).sum(), m.sum().float()]))
        return totals[0], totals[1]

    def global_mean(self, values: Tensor, subset: Tensor | None = None) -> Tensor:
        """The mean of ``values`` over the counted tokens ((B, T) values) or rows ((B,) values) of ``subset``
        (default: all) of every process's micro-batch: a scalar loss term with its own denominator, for
        ``TokenTerms.scalar``.

        Its value is the global mean on every process; its gradient flows through this process's items scaled by
        ``num_processes / global count``, so the gradient DDP applies (the mean over processes) is the gradient
        one process holding all the rows would compute. Every process must call it (it reduces across them).
        """
        m = self._counted(values, subset)
        total, count = self.global_sum_count(values, subset)
        count = count.clamp(min=1.0)
        local = (values.float() * m).sum() * (self.num_processes / count)
        return local + (total / count - local).detach()

    def _counted(self, values: Tensor, subset: Tensor | None) -> Tensor:
        if values.dim() == 1:  # one value per row
            return torch.ones_like(values, dtype=torch.float32) if subset is None else subset.float()
        return self.mask if subset is None else self.mask * subset.to(self.mask.dtype)

    def has_carried(self, name: str) -> bool:
        """Whether this method's reward or advantage hook carried ``name`` into this micro-batch."""
        return self.key(name) in self.carried

    def carried_value(self, name: str) -> Tensor:
        """What this method's reward or advantage hook passed on with ``RolloutBatch.carry(name, ...)``."""
        key = self.key(name)
        if key not in self.carried:
            raise KeyError(f"nothing carried under '{key}': call batch.carry('{name}', ...) in an earlier hook")
        return self.carried[key]

    def ppo_clipped(self) -> Tensor:
        """Tokens whose PPO ratio is clipped (the clip term is the active one), (B, T) bool.

        Same definition as TRL's ``clip_ratio/region_mean``: the ratio left [1-eps_low, 1+eps_high]
        in the direction the advantage pushes it.
        """
        low, high = clipped_sides(self.logps, self.old_logps, self.advantages, self.mask, self.epsilon_low,
                                  self.epsilon_high)
        return low | high

    def kl(self) -> Tensor:
        """TRL's per-token KL term before ``beta``, (B, T) with grad: the k3 estimator against the
        reference model, times the importance weight when ``use_bias_correction_kl`` (as TRL does)."""
        if self.ref_logps is None:
            raise RuntimeError("kl() needs reference log-probs, which TRL computes only when beta != 0")
        delta = self.ref_logps - self.logps
        kl = torch.exp(delta) - delta - 1
        if self.bias_correction_kl:
            log_ratio = self.logps - self.old_logps
            if self.importance_sampling_level == "sequence":
                log_ratio = ((log_ratio * self.mask).sum(-1) / self.mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
            kl = kl * torch.exp(log_ratio)
        return kl

    def generator(self, salt: int = 0, per_process: bool = False) -> torch.Generator:
        """A CPU generator seeded from (seed, step, micro-step, salt), optionally per process.

        The same on every process unless ``per_process``: global selections then agree everywhere.
        """
        key = (self.seed, self.step, self.micro_step, salt, self.process_index if per_process else -1)
        return torch.Generator().manual_seed(stable_hash(key))

    def log(self, name: str, value: float | Tensor, reduce: Literal["mean", "sum", "max", "min"] = "mean",
            count: float | Tensor | None = None) -> None:
        """Log ``<method>/<name>``; local values are reduced across processes with ``reduce``.

        ``count`` (with ``reduce="mean"``): how many items ``value`` is the mean of, e.g. this micro-batch's valid
        tokens. Processes are then weighted by it, so the logged value is the mean over every item of every
        process, the same on 1 and N processes; without it each process counts once.
        """
        value = value.detach().float() if isinstance(value, Tensor) else torch.tensor(float(value))
        weight = count.detach().float() if isinstance(count, Tensor) else torch.tensor(1.0 if count is None else float(count))
        self.metrics[self.key(name)] = (value.reshape(()), reduce, weight.reshape(()).to(value.device))


@dataclass
class TokenTerms:
    """What a token-level hook returns; every field is optional.

    - ``weight`` (B, T), >= 0: multiplies each token's policy-gradient term. It is folded into the
      advantages, which is exact for every TRL loss type because each is linear in A for A scaled
      by a non-negative factor. Normalisers are unchanged: a zero-weight token still counts.
    - ``detach`` (B, T) bool: stops the gradient through the token's log-prob (policy-gradient and
      KL terms); the loss value is unchanged.
    - ``extra`` (B, T), with grad: an extra per-token loss term, masked and normalised with the same
      ``loss_type`` normaliser TRL applies to the policy loss.
    - ``scalar`` (), with grad: an extra loss term with its own denominator, added to the micro-batch's loss and
      divided only by the gradient-accumulation steps (as TRL's entropy bonus is). Build it from
      ``LossBatch.global_mean`` (a mean over all tokens or a subset of them, on every process together) so that
      it is exact under every ``loss_type`` and every process count.
    - ``eps_low``, ``eps_high`` (B, T): per-token PPO clip range, replacing TRL's ``epsilon_low``/``epsilon_high``
      for this micro-batch inside TRL's own loss (token-level importance sampling only). Where a method gives
      none, TRL's scalar range holds.
    """

    weight: Tensor | None = None
    detach: Tensor | None = None
    extra: Tensor | None = None
    scalar: Tensor | None = None
    eps_low: Tensor | None = None
    eps_high: Tensor | None = None


# ----------------------------------------------------------------------------------------------------------
# The method base class


class Method:
    """Base class: identity on every hook. Subclasses are ``@dataclass``es registered with ``@register``.

    Class attributes:
        name: the registry key (set by ``@register``).
        needs: rollout statistics (subset of ``ROLLOUT_STATS``) the trainer must compute for it.
        loss_needs: loss-time inputs (subset of ``LOSS_INPUTS``) the trainer must provide, e.g. reference log-probs.

    ``self.state`` holds whatever the method adapts over training. It must be JSON-serialisable,
    is saved with every checkpoint and restored on resume, and must be updated only from global
    (gathered) quantities so that it stays identical on every process.
    """

    name: ClassVar[str] = "method"
    needs: ClassVar[frozenset[str]] = frozenset()
    loss_needs: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        self.state: dict[str, Any] = self.init_state()
        self.validate()

    # -- construction and checks ------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`MethodConfigError` for out-of-range parameters (called on construction)."""

    def check(self, args: Any) -> None:
        """Raise :class:`MethodConfigError` if the trainer configuration cannot work with this method."""

    def init_state(self) -> dict[str, Any]:
        return {}

    def reward_inputs(self) -> list[str]:
        """Names of the run's reward functions this method reads (checked when the trainer is built)."""
        return []

    # -- hooks (identity by default) ----------------------------------------------------------------------
    def configure(self, args: Any) -> None:
        """Adjust the TRL configuration before the trainer is built (used to expose TRL's own features)."""

    def trl_settings(self, step: int) -> dict[str, float]:
        """TRL trainer settings (keys in ``TRL_SETTINGS``) this method drives, read before optimizer step ``step``
        (0-based): how a schedule steers TRL's own entropy bonus without re-implementing it."""
        return {}

    def rollout(self, ctx: RolloutContext, generate: GenerateFn) -> Rollout:
        """Produce the batch's completions; call ``generate`` for the rows and temperatures you want."""
        return generate(None, None)

    def reward(self, rewards: Tensor, batch: RolloutBatch) -> Tensor:
        """Reshape the scalar rewards, (N,) -> (N,). The difference is logged as ``rewards/<method>``."""
        return rewards

    def advantage(self, advantages: Tensor, batch: RolloutBatch) -> Tensor:
        """Rescale or replace advantages: (N,) or (N, T) in, (N,) or (N, T) out."""
        return advantages

    def logit_stat(self, logits: Tensor) -> Tensor:
        """A per-token statistic of the training forward's logits, with gradient: (n, V) float32 logits (already
        divided by the temperature) of ``n`` counted completion positions in, (n,) out.

        It runs inside the training forward on chunks of positions and is recomputed in the backward pass, so no
        (B, T, V) tensor is kept; ``token_loss`` reads the result with ``batch.logit_stat()``. The trainer computes
        it only for methods that override it: the default, the full token entropy, is what ``batch.entropy``
        already holds from TRL's fused head, so override it for another function of the logits.
        """
        logp = torch.log_softmax(logits, dim=-1)  # (n, V)
        return -(logp.exp() * logp).sum(-1)

    def token_loss(self, batch: LossBatch) -> TokenTerms | None:
        """Per-token weights, detach masks and extra loss terms for one loss micro-batch."""
        return None

    # -- introspection ------------------------------------------------------------------------------------
    @classmethod
    def hooks(cls) -> list[str]:
        """The hooks this method overrides, in pipeline order."""
        return [h for h in HOOKS if getattr(cls, h) is not getattr(Method, h)]

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""
