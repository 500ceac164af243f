"""The recipe schema: the one definition of every recipe key, its type, range, default and help text.

`psipo validate`, the error messages, the README's key reference (`make docs`) and the trainers all read
these models; nothing else declares a recipe key. Every model forbids unknown keys.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from psipo_cli.errors import UserError
from psipo_cli.objectives import DEFAULT_AGGREGATION, check_psi, resolve_psi
from psipo_cli.recipe.sampling import SAMPLING_LOSSES, RolloutSection, check_rollout
from psipo_cli.recipe.section import Section


class ModelSection(Section):
    name_or_path: str = Field(
        description="Hub id (e.g. mistralai/Mistral-7B-v0.1) or local directory of the base model."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype the base weights are loaded in; 'auto' keeps the checkpoint's."
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none",
        description="Load the base through bitsandbytes: '4bit' (NF4, QLoRA) or '8bit'; adapters stay in bf16.",
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (QLoRA uses nf4).")
    double_quant: bool = Field(True, description="Quantise the 4-bit quantisation constants too (QLoRA's default).")
    trust_remote_code: bool = Field(
        False,
        description="Run modelling code shipped with a hub model. Off unless you trust that repository.",
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flex_attention"] | None = Field(
        None, description="Attention kernel; empty lets transformers choose."
    )


class AdapterSection(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (the update is scaled by alpha / r).")
    dropout: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="Dropout on the LoRA input, in training; every other dropout of the model is off (the policy "
        "and the adapter-off reference must differ only by the adapter). Empty: 0.05, and 0 for rlhf and "
        "online_psipo, which must score responses with the very policy that sampled them.",
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names to adapt, or 'all-linear' for every linear layer but the LM head.",
    )
    init_from: str | None = Field(
        None,
        description="Existing LoRA adapter (e.g. an SFT adapter) to start from; the reference is then a frozen copy "
        "of it, not the bare base.",
    )

    @field_validator("target_modules")
    @classmethod
    def _no_lm_head(cls, value: list[str] | str) -> list[str] | str:
        # The log-probs are computed from lm_head.weight directly (TRL's fused head): an adapter there never trains.
        if isinstance(value, list) and "lm_head" in value:
            raise ValueError("'lm_head' cannot be adapted: log-probs are computed from its weight directly")
        if isinstance(value, list) and not value:
            raise ValueError("give at least one module name, or 'all-linear'")
        return value


class DataSource(Section):
    path: str = Field(description="Local .jsonl/.json/.parquet/.csv file, or a hub dataset id.")
    split: str = Field("train", description="Split to read from a hub dataset (ignored for local files).")
    subset: str | None = Field(None, description="Hub dataset configuration name, if it has several.")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: object) -> object:
        # `train: data/x.jsonl` is shorthand for `train: {path: data/x.jsonl}`.
        return {"path": value} if isinstance(value, str) else value


class Columns(Section):
    prompt: str = Field("prompt", description="Column with the prompt (text, or a list of chat messages).")
    chosen: str = Field("chosen", description="Column with the preferred response (text or messages).")
    rejected: str = Field("rejected", description="Column with the dispreferred response (text or messages).")
    label: str | None = Field(
        None, description="Column with p̂, the probability in [0, 1] that chosen is preferred (soft label)."
    )
    votes_chosen: str | None = Field(None, description="Column with annotator votes for chosen (p̂ = votes / total).")
    votes_total: str | None = Field(None, description="Column with the number of annotators (with votes_chosen).")
    score_chosen: str | None = Field(
        None,
        description="Column with a rating of chosen; with score_rejected, p̂ = σ((s_c − s_r) / score_scale).",
    )
    score_rejected: str | None = Field(None, description="Column with a rating of rejected (with score_chosen).")
    score_scale: float = Field(1.0, gt=0, description="Rating difference that counts as one logit of preference.")

    @model_validator(mode="after")
    def _one_label_source(self) -> Columns:
        if (self.votes_chosen is None) != (self.votes_total is None):
            raise ValueError("votes_chosen and votes_total go together")
        if (self.score_chosen is None) != (self.score_rejected is None):
            raise ValueError("score_chosen and score_rejected go together")
        sources = [self.label is not None, self.votes_chosen is not None, self.score_chosen is not None]
        if sum(sources) > 1:
            raise ValueError("give soft labels one way: label, votes or scores")
        return self

    @property
    def label_columns(self) -> list[str]:
        names = (self.label, self.votes_chosen, self.votes_total, self.score_chosen, self.score_rejected)
        return [name for name in names if name is not None]

    @property
    def has_labels(self) -> bool:
        return bool(self.label_columns)


class DataSection(Section):
    train: DataSource = Field(description="Training pairs: a path or hub id, or {path, split, subset}.")
    eval: DataSource | None = Field(None, description="Held-out pairs, evaluated every training.eval_steps.")
    columns: Columns = Field(default_factory=Columns, description="Where prompt, responses and labels live.")
    max_length: int = Field(512, ge=8, description="Longest prompt+response in tokens; longer pairs are truncated.")
    too_long: Literal["drop", "error"] = Field(
        "drop",
        description="A prompt that alone fills max_length leaves nothing to learn (for rlhf and online_psipo: one "
        "longer than max_length − rollout.max_new_tokens): drop it (counted), or fail.",
    )


class ObjectiveSection(Section):
    loss: Literal["dpo", "ipo", "psipo", "reward", "rlhf", "online_psipo"] = Field(
        "ipo",
        description="dpo: −log σ(τh) (eq. 9); ipo: (h − 1/(2τ))² (eq. 28); psipo: regress h to (Ψ(p̂)−Ψ(1−p̂))/(2τ); "
        "reward: a Bradley–Terry reward model, −log σ(r_w − r_l) (eq. 5), for `psipo label` and the stages below; "
        "rlhf: maximise E[r] − τ·KL(π‖π_ref) (eq. 6) with RLOO, r from rollout.reward_model; online_psipo: ΨPO on "
        "pairs sampled from the policy each step and labelled p̂ = σ(r(y) − r(y′)) (identity Ψ: online IPO).",
    )
    tau: float = Field(
        0.1,
        gt=0,
        description="Regularisation strength τ (DPO's β; for rlhf the KL coefficient of eq. 6, TRL's β, on the "
        "sequence KL). Smaller τ allows larger margins.",
    )
    psi: str = Field(
        "identity",
        description="Ψ for psipo: a registered name (identity, logit) or an expression in q of at most 200 characters "
        "built from numbers, q, + - * / **, parentheses and log, exp, sqrt, tanh, sigmoid, log1p, expm1 (e.g. "
        "'2*q - 1', 'tanh(4*(q - 0.5))'). It must be finite on [0, 1] (if it is infinite at 0 or 1, p̂ is clipped "
        "into [label_eps, 1 − label_eps] as for logit), non-decreasing, and not constant.",
    )
    logps: Literal["sum", "mean"] | None = Field(
        None,
        description="Sequence log-prob: sum or token mean over the response. Empty: sum for dpo, mean for ipo/psipo.",
    )
    label_eps: float = Field(
        0.01,
        gt=0,
        lt=0.5,
        description="Soft labels are clipped into [ε, 1−ε] for Ψ that are infinite at 0 and 1.",
    )
    precompute_ref_log_probs: bool = Field(
        False, description="Compute the reference log-probs once before training instead of on every step."
    )

    @field_validator("psi")
    @classmethod
    def _known_psi(cls, value: str) -> str:
        check_psi(value)  # ValueError saying why: unknown name, disallowed syntax, not finite/monotone, constant
        return value

    @model_validator(mode="after")
    def _psi_at_label_eps(self) -> ObjectiveSection:
        # _known_psi checked Ψ with the default ε; one infinite at 0 or 1 is used on [label_eps, 1 − label_eps].
        # Raised as UserError (which pydantic passes through) so the message names objective.psi, not the section.
        try:
            check_psi(self.psi, self.label_eps)
        except ValueError as err:
            raise UserError(f"{err} (with objective.label_eps={self.label_eps:g})", where="objective.psi") from None
        return self

    @model_validator(mode="after")
    def _default_aggregation(self) -> ObjectiveSection:
        # Resolve the default here so the run's recipe.yaml records what was actually used.
        if self.logps is None and self.loss in DEFAULT_AGGREGATION:  # a reward model scores whole sequences
            self.logps = DEFAULT_AGGREGATION[self.loss]
        if self.logps is None and self.loss == "online_psipo":
            # Sums: online IPO's fixed point is the Nash equilibrium π* ∝ π_ref·exp(P(y ≻ π*)/τ) for sequence
            # log-probs; with token means it would scale each response's pull by its length.
            self.logps = "sum"
        return self


class TrainingSection(Section):
    """Handed to TRL's DPOConfig under the same names."""

    learning_rate: float = Field(5e-5, gt=0, description="Peak AdamW learning rate.")
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps to run; -1 uses num_train_epochs.")
    num_train_epochs: float = Field(1.0, gt=0, description="Passes over the training pairs (when max_steps is -1).")
    per_device_train_batch_size: int = Field(
        4,
        ge=1,
        description="Pairs per device per micro-batch (prompts for rlhf and online_psipo); with pack_tokens, rows of "
        "pack_tokens tokens per micro-batch, filled with as many pairs as fit.",
    )
    per_device_eval_batch_size: int = Field(
        8, ge=1, description="Pairs per device per evaluation batch (prompts for rlhf and online_psipo)."
    )
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    seed: int = Field(42, description="Seed for adapter init, data order and dropout.")
    logging_steps: int = Field(10, ge=1, description="Write a metrics.jsonl line every this many steps.")
    save_steps: int = Field(500, ge=1, description="Save a checkpoint every this many steps.")
    save_total_limit: int | None = Field(
        2, ge=1, description="Keep at most this many complete checkpoints (old ones go once a new one is sealed)."
    )
    max_bad_steps: int = Field(
        3,
        ge=1,
        description="Stop after this many steps in a row whose loss or gradient norm is not finite (their updates are "
        "dropped and they save no checkpoint; under DeepSpeed the first stops the run); exit code 3.",
    )
    eval_steps: int | None = Field(
        None, ge=1, description="Evaluate data.eval every this many steps (default: logging_steps)."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    bf16: bool = Field(False, description="bfloat16 mixed precision.")
    fp16: bool = Field(False, description="float16 mixed precision.")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warm-up."
    )
    warmup_steps: float = Field(0, ge=0, description="Warm-up steps (a value below 1 is a fraction of all steps).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optim: str = Field("adamw_torch", description="Optimizer name as transformers knows it (e.g. paged_adamw_8bit).")
    dataloader_num_workers: int = Field(0, ge=0, description="Data-loading worker processes.")
    prefix_sharing: bool | Literal["auto"] = Field(
        "auto",
        description="Compute each pair's prompt once: one [prompt | chosen | rejected] row with a 4-D attention mask. "
        "auto: checked against TRL's concatenated layout on the first batch, falling back to it (and saying so) if "
        "the model does not give the same log-probs; true: the same check, but a mismatch stops the run; false: TRL's "
        "layout, prompt computed twice.",
    )
    pack_tokens: int | None = Field(
        None,
        ge=8,
        description="Pack pairs into rows of at most this many tokens (prefix sharing on: pairs never attend to each "
        "other, positions restart at each pair), so pairs of unequal length carry little padding; a training batch is "
        "then per_device_train_batch_size such rows holding as many pairs as fit (evaluation keeps its pair count). "
        "Checked on the first batch like prefix sharing. null: one pair per row.",
    )

    @model_validator(mode="after")
    def _one_precision(self) -> TrainingSection:
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are exclusive")
        return self


class DistributedSection(Section):
    """How the run spreads over processes. Launch with `accelerate launch ... -m psipo_cli` or `psipo launch`."""

    strategy: Literal["auto", "ddp", "zero2", "zero3"] = Field(
        "auto",
        description="auto/ddp: no DeepSpeed from the recipe (the accelerate config decides); zero2/zero3: DeepSpeed "
        "ZeRO stage 2 or 3 configured by psipo.",
    )
    offload_optimizer: bool = Field(False, description="ZeRO: keep optimizer state in CPU memory.")
    offload_params: bool = Field(False, description="ZeRO-3: keep parameters in CPU memory.")
    deepspeed_config: str | None = Field(
        None, description="Your own DeepSpeed JSON (relative to the recipe); replaces the generated one."
    )

    @model_validator(mode="after")
    def _consistent(self) -> DistributedSection:
        if self.offload_params and self.strategy != "zero3":
            raise ValueError("offload_params needs strategy: zero3")
        if self.offload_optimizer and self.strategy not in ("zero2", "zero3"):
            raise ValueError("offload_optimizer needs strategy: zero2 or zero3")
        if self.deepspeed_config and self.strategy == "ddp":
            raise ValueError("deepspeed_config contradicts strategy: ddp")
        return self

    @property
    def zero_stage(self) -> int | None:
        return {"zero2": 2, "zero3": 3}.get(self.strategy)


class OutputSection(Section):
    dir: str = Field(description="Run directory: recipe, metrics, adapter, summary and checkpoints go here.")
    report_to: list[Literal["none", "tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["none"], description="Experiment trackers to log to, as in transformers."
    )
    push_to_hub: bool = Field(
        False,
        description="At the end of the run, upload it (adapter, tokenizer, model card, metrics; no checkpoints) to "
        "output.hub_model_id, created private if new. The token comes from HF_TOKEN or `hf auth login`, never a file.",
    )
    hub_model_id: str | None = Field(
        None, description="Hub model repository to push to with push_to_hub, e.g. your-name/zephyr-7b-ipo."
    )

    @field_validator("hub_model_id")
    @classmethod
    def _repo_id(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", value):
            raise ValueError("a hub repository id looks like name or owner/name (letters, digits, '-', '_', '.')")
        return value

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value


class Recipe(Section):
    """A whole psipo recipe. `extends:` is resolved by the loader before validation."""

    description: str = Field("", description="One line saying what the recipe is for (shown by `psipo recipes`).")
    model: ModelSection = Field(description="The base model.")
    adapter: AdapterSection = Field(default_factory=AdapterSection, description="The LoRA adapter that is trained.")
    data: DataSection = Field(description="The preference pairs.")
    objective: ObjectiveSection = Field(default_factory=ObjectiveSection, description="The objective and τ.")
    training: TrainingSection = Field(default_factory=TrainingSection, description="Optimisation settings.")
    distributed: DistributedSection = Field(
        default_factory=DistributedSection, description="Multi-process / DeepSpeed settings."
    )
    rollout: RolloutSection | None = Field(
        None, description="Sampling and the reward model, for objective.loss rlhf and online_psipo only."
    )
    output: OutputSection = Field(description="Where the run goes.")

    @model_validator(mode="after")
    def _labels_match_objective(self) -> Recipe:
        labels = self.data.columns.has_labels
        if self.objective.loss == "ipo" and labels:
            raise ValueError(
                "objective.loss: ipo uses hard labels and would ignore data.columns' soft labels; "
                "use psipo (identity Ψ is IPO with soft labels)"
            )
        if self.objective.loss == "reward" and self.objective.precompute_ref_log_probs:
            raise ValueError("objective.precompute_ref_log_probs: a reward model has no reference policy")
        psi = resolve_psi(self.objective.psi, self.objective.label_eps)
        if self.objective.loss == "psipo" and not psi.linear and not labels:
            # Proposition 3 (unbiased averaging of hard labels) holds when Ψ(q) − Ψ(1 − q) is linear (identity).
            raise ValueError(
                f"objective.psi: a non-linear Ψ ('{self.objective.psi}') needs probability estimates; "
                "set data.columns.label (or votes_chosen/votes_total)"
            )
        if self.training.prefix_sharing is True and self.model.attn_implementation == "flash_attention_2":
            raise ValueError(
                "training.prefix_sharing needs an attention kernel that takes a 4-D mask (eager, sdpa, "
                "flex_attention); set training.prefix_sharing: auto or false to use flash_attention_2"
            )
        if self.training.pack_tokens is not None and self.objective.loss not in ("dpo", "ipo", "psipo"):
            raise ValueError(
                f"training.pack_tokens packs preference pairs; objective.loss {self.objective.loss} has none"
            )
        if self.training.pack_tokens is not None and self.training.prefix_sharing is False:
            raise ValueError(
                "training.pack_tokens packs prefix-shared rows; it needs training.prefix_sharing: auto or true"
            )
        if self.model.quantization != "none" and self.model.dtype == "float16" and self.training.bf16:
            raise ValueError("model.dtype: float16 weights with training.bf16 mix precisions; pick one")
        return self

    @model_validator(mode="after")
    def _default_dropout(self) -> Recipe:
        # Resolved here so the run's recipe.yaml records what was used.
        if self.adapter.dropout is None:
            self.adapter.dropout = 0.0 if self.objective.loss in SAMPLING_LOSSES else 0.05
        return self

    @model_validator(mode="after")
    def _rollout_matches_objective(self) -> Recipe:
        loss, rollout = self.objective.loss, self.rollout
        if loss not in SAMPLING_LOSSES:
            if rollout is not None:
                raise UserError(
                    f"applies to objective.loss rlhf and online_psipo only (this recipe trains {loss})", where="rollout"
                )
            return self
        if rollout is None:
            raise UserError(f"objective.loss: {loss} needs the reward model to sample against", where="rollout")
        check_rollout(self, rollout)
        return self

    @model_validator(mode="after")
    def _hub_target(self) -> Recipe:
        if self.output.push_to_hub and not self.output.hub_model_id:
            raise ValueError("output.hub_model_id: output.push_to_hub needs the hub repository to push to (owner/name)")
        return self
