"""`psipo frontier`: the paper's claim measured on generations, against a gold preference (`gold`).

For each seed: two responses per training prompt are sampled from the tiny reference model and labelled by
Bradley–Terry annotators who follow the gold preference, once per pair (hard: p̂ ∈ {0, 1}, the regime of the
paper's §4.2) and many times per pair (soft, the control). A reward model is trained on the hard pairs. Then every
method trains from the same reference, for the same number of steps on the same responses per step, at each τ:

- dpo, ipo: the hard pairs;  psipo-logit: the hard pairs relabelled p̂ = σ(r(y_w) − r(y_l)) by the reward model;
- rlhf, online-ipo: the training prompts, rewarded or labelled by that reward model;
- dpo-soft, ipo-soft (ΨPO with identity Ψ): the soft pairs, p̂ = votes / annotators (the control).

Every run is psipo's own recipe (a shipped tiny one plus overrides, listed in the JSON) trained by
`finetune.run`; nothing here trains. Each checkpoint's policy is sampled on held-out prompts and judged by
`frontier_eval.Judge`: gold win rate against π_ref and KL(π‖π_ref), each with a 95% interval over prompts.
This module says what the experiment is (methods, settings, each run's overrides); `frontier_run` runs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from psipo_cli.errors import UserError

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
DATA = REPO / "data" / "tiny-prefs"
RESPONSES_PER_STEP = 32  # every method's optimizer step sees 32 sampled responses (16 pairs, or 8 prompts × 4)


@dataclass(frozen=True)
class Method:
    """One way to train a policy: a shipped recipe, the data it reads, its overrides (besides the shared ones)."""

    recipe: str
    data: str  # "hard", "soft" or "labelled" (hard pairs with the reward model's p̂): a file of the seed's folder
    overrides: tuple[str, ...] = ()
    rollout: bool = False  # a stage that samples while training and calls the reward model itself
    responses: int = 2  # per prompt in a step: a pair, or RLOO's group (rollout.responses_per_prompt)

    @property
    def uses_reward_model(self) -> bool:
        """It samples against the seed's reward model, or reads pairs that model labelled."""
        return self.rollout or self.data == "labelled"


# h is a difference of sequence log-ratios for every method (objective.logps: sum; rlhf's KL is per sequence), so
# τ is one KL coefficient for all of them and the paper's optima compare: IPO's margin 1/(2τ), RLHF's π ∝ π_ref·e^{r/τ}.
METHODS: dict[str, Method] = {
    "dpo": Method("tiny-ipo.yaml", "hard", ("objective.loss=dpo", "objective.logps=sum")),
    "ipo": Method("tiny-ipo.yaml", "hard", ("objective.loss=ipo", "objective.logps=sum")),
    "psipo-logit": Method(
        "tiny-ipo.yaml",
        "labelled",
        ("objective.loss=psipo", "objective.psi=logit", "objective.logps=sum", "data.columns.label=p_hat"),
    ),
    "rlhf": Method("tiny-rlhf.yaml", "hard", (), rollout=True, responses=4),
    "online-ipo": Method("tiny-online-ipo.yaml", "hard", ("objective.psi=identity",), rollout=True),
    "dpo-soft": Method(
        "tiny-ipo.yaml", "soft", ("objective.loss=dpo", "objective.logps=sum", "data.columns.label=p_chosen")
    ),
    "ipo-soft": Method(
        "tiny-ipo.yaml",
        "soft",
        ("objective.loss=psipo", "objective.psi=identity", "objective.logps=sum", "data.columns.label=p_chosen"),
    ),
}


@dataclass(frozen=True)
class Settings:
    """The experiment's size (`defaults`)."""

    taus: tuple[float, ...] = (0.01, 0.05, 0.25)
    seeds: int = 2
    methods: tuple[str, ...] = tuple(METHODS)
    steps: int = 240
    checkpoints: int = 4  # judged along each run, the last step's included (the over-training curves)
    learning_rate: float = 5e-3
    train_prompts: int = 0  # 0: every distinct plain-text prompt of data/tiny-prefs/train.jsonl (881)
    eval_prompts: int = 64  # distinct plain-text prompts of data/tiny-prefs/eval.jsonl
    samples_per_prompt: int = 4
    max_new_tokens: int = 16
    soft_annotators: int = 16
    reward_steps: int = 150
    workers: int = 2
    quick: bool = False

    @classmethod
    def defaults(cls, quick: bool = False) -> Settings:
        """`make frontier`'s settings, or with `quick` the test suite's small version."""
        if not quick:
            return cls()
        return cls(
            taus=(0.05,),
            seeds=1,
            steps=4,
            checkpoints=2,
            train_prompts=48,
            eval_prompts=6,
            samples_per_prompt=2,
            reward_steps=4,
            workers=1,
            quick=True,
        )

    @property
    def judged_every(self) -> int:
        return max(1, self.steps // self.checkpoints)

    @property
    def judged_steps(self) -> list[int]:
        return [*range(self.judged_every, self.steps, self.judged_every), self.steps]

    @classmethod
    def from_options(cls, quick: bool, **options: Any) -> Settings:
        """The defaults (or the quick form's) with the command line's options in place: those given, a repeated
        option's values as a tuple."""
        given = {key: tuple(value) if isinstance(value, list) else value for key, value in options.items()}
        settings = replace(
            cls.defaults(quick), **{key: value for key, value in given.items() if value not in (None, ())}
        )
        settings.check()
        return settings

    def command(self) -> str:
        """The `psipo frontier` command line that gives these settings."""
        base = Settings.defaults(self.quick)
        words = ["psipo", "frontier"] + (["--quick"] if self.quick else [])
        for key, flag in (("taus", "--tau"), ("methods", "--method")):
            if getattr(self, key) != getattr(base, key):
                words += [f"{flag} {value:g}" if key == "taus" else f"{flag} {value}" for value in getattr(self, key)]
        for key in ("seeds", "steps", "workers"):
            if getattr(self, key) != getattr(base, key):
                words.append(f"--{key} {getattr(self, key)}")
        return " ".join(words)

    def check(self) -> None:
        """One line naming the option, before anything is sampled or trained."""
        unknown = [name for name in self.methods if name not in METHODS]
        if unknown:
            raise UserError(f"unknown method {unknown[0]!r}; valid: {', '.join(METHODS)}", where="--method")
        if not all(math.isfinite(tau) and tau > 0 for tau in self.taus):
            raise UserError("every τ must be a positive number", where="--tau")
        for key, values in (("--tau", self.taus), ("--method", self.methods)):
            if len(set(values)) < len(values):
                raise UserError("a value is given twice (its runs would share one folder)", where=key)
        for key in ("seeds", "steps", "workers"):
            if getattr(self, key) < 1:
                raise UserError("must be at least 1", where=f"--{key}")


def run_dir(work: Path, name: str, tau: float, seed: int) -> Path:
    return work / f"{name}-tau{tau:g}-seed{seed}"


def method_overrides(settings: Settings, name: str, tau: float, seed: int, work: Path) -> list[str]:
    """The overrides of one (method, τ, seed) run on its method's shipped recipe; the same for every method except
    where a stage needs its own (its data file, the reward model, pairs or prompts per step)."""
    method, folder = METHODS[name], work / f"seed{seed}"
    overrides = [
        f"data.train={folder / (method.data + '.jsonl')}",
        "data.eval=null",
        f"objective.tau={tau}",
        f"training.max_steps={settings.steps}",
        f"training.learning_rate={settings.learning_rate}",
        "training.lr_scheduler_type=constant",  # a rate decayed to 0 would hide over-training
        f"training.per_device_train_batch_size={RESPONSES_PER_STEP // method.responses}",
        f"training.logging_steps={max(1, settings.judged_every // 5)}",
        f"training.save_steps={settings.judged_every}",  # the last step's policy is the run directory's own
        "training.save_total_limit=null",  # every checkpoint is judged afterwards
        f"training.seed={seed}",
        f"output.dir={run_dir(work, name, tau, seed)}",
        *method.overrides,
    ]
    if method.rollout:
        overrides += [f"rollout.reward_model={folder / 'reward'}", f"rollout.max_new_tokens={settings.max_new_tokens}"]
        overrides.append(f"rollout.responses_per_prompt={method.responses}")
    return overrides
