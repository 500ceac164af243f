"""The sampling stages (rlhf, online_psipo) computed against closed forms on their own samples.

Each check takes one batch the trainer sampled and recomputes what the stage must have done with plain forwards
of the model (adapter on: π; adapter off: π_ref; full logits, no cache, no TRL code) and the reward model:
- rlhf (eq. 6): RLOO's advantage of response i is R_i − mean_{j≠i} R_j over its prompt's k responses, with
  R = r − τ·Σ_t (log π − log π_ref) over the whole response;
- online_psipo: p̂ = σ(r(y) − r(y′)), and with identity Ψ the loss is mean (h − (p̂ − ½)/τ)², h from sequence
  log-probs (objective.logps defaults to sum for online_psipo);
- IPO-MD's sampler: next-token log-probs (1 − β)·log π + β·log π_ref, through a left-padded, cached generation.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from psipo_cli.models.loading import load_tokenizer, use_adapter
from psipo_cli.recipe.loader import load_recipe
from psipo_cli.training.finetune import build_trainer, prepare
from psipo_cli.training.mixture import MixtureLogits
from psipo_cli.training.reward import load_reward_model, resolve_reward_run, score
from tests.conftest import rollout_sections, tiny_recipe

PROMPTS = 3


def _build(tmp_path: Path, reward_dir: Path, loss: str, **rollout: Any) -> Any:
    path = tmp_path / "recipe.yaml"
    sections = rollout_sections(reward_dir, loss, **rollout)
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "run", **sections)), encoding="utf-8")
    trainer = build_trainer(prepare(load_recipe(path)))
    generator = torch.Generator().manual_seed(0)
    for name, param in trainer.model.named_parameters():  # a policy away from the reference (LoRA B starts at 0)
        if "lora_B.default" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.1
    return trainer


def _sampled(trainer: Any, k: int) -> tuple[list[str], dict[str, Any]]:
    prompts = [row["prompt"] for row in trainer.train_dataset.select(range(PROMPTS))]
    inputs = [{"prompt": p} for p in prompts for _ in range(k)]  # as TRL's sampler repeats each prompt
    torch.manual_seed(1)
    return [i["prompt"] for i in inputs], trainer._generate_and_score_completions(inputs)


def _plain_logps(model: Any, prompt: torch.Tensor, completion: torch.Tensor, adapter: bool) -> torch.Tensor:
    """Per-token log-probs of `completion` after `prompt` (unpadded), from full logits."""
    ids = torch.cat([prompt, completion])[None]
    with torch.no_grad(), contextlib.nullcontext() if adapter else use_adapter(model, None):
        logits = model(input_ids=ids).logits[0].float()
    logps = logits[:-1].log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
    return logps[len(prompt) - 1 :]


def _rows(out: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(prompt, completion) token ids of each sampled response, padding removed."""
    prompts = [ids[mask.bool()] for ids, mask in zip(out["prompt_ids"], out["prompt_mask"], strict=True)]
    masks = out["completion_mask"].reshape(-1, out["completion_mask"].shape[-1])
    completions = [ids[mask.bool()] for ids, mask in zip(out["completion_ids"].reshape_as(masks), masks, strict=True)]
    per_prompt = len(completions) // len(prompts)
    return [(prompts[i // per_prompt], c) for i, c in enumerate(completions)]


def _rewards(reward_dir: Path, prompts: list[str], completions: list[torch.Tensor]) -> torch.Tensor:
    recipe, run_dir = resolve_reward_run(reward_dir)
    tokenizer = load_tokenizer(recipe.model)
    model = load_reward_model(recipe, run_dir, tokenizer)
    texts = [(p, tokenizer.decode(c, skip_special_tokens=False)) for p, c in zip(prompts, completions, strict=True)]
    return torch.tensor(score(model, tokenizer, texts, max_length=recipe.data.max_length))


def test_rlhf_advantages_are_eq6_rewards_with_a_leave_one_out_baseline(tmp_path: Path, reward_run: Path) -> None:
    k, tau = 4, 0.1
    trainer = _build(tmp_path, reward_run, "rlhf", responses_per_prompt=k)
    prompts, out = _sampled(trainer, k)
    rows = _rows(out)
    policy = torch.stack([_plain_logps(trainer.model, p, c, True).sum() for p, c in rows])
    reference = torch.stack([_plain_logps(trainer.model, p, c, False).sum() for p, c in rows])
    kl = policy - reference
    assert kl.abs().max() > 0.01, "policy equals reference: the test would not see τ·KL"
    r = _rewards(reward_run, prompts, [c for _, c in rows])
    total = (r - tau * kl).view(PROMPTS, k)
    baseline = (total.sum(1, keepdim=True) - total) / (k - 1)
    torch.testing.assert_close(out["advantages"], (total - baseline).flatten(), atol=1e-4, rtol=0)
    torch.testing.assert_close(out["old_logps"], policy, atol=1e-4, rtol=0)
    assert trainer._metrics["train"]["kl_sequence"][-1] == pytest.approx(kl.mean().item(), abs=1e-4)


@pytest.mark.parametrize("label", ["soft", "bernoulli"])
def test_online_ipo_regresses_h_to_the_reward_models_preference(tmp_path: Path, reward_run: Path, label: str) -> None:
    tau = 0.1
    trainer = _build(tmp_path, reward_run, "online_psipo", label=label)
    prompts, out = _sampled(trainer, 2)
    rows = _rows(out)
    tokens = [(_plain_logps(trainer.model, p, c, True), _plain_logps(trainer.model, p, c, False)) for p, c in rows]
    ref_sums = torch.stack([ref.sum() for _, ref in tokens]).view(PROMPTS, 2)
    torch.testing.assert_close(out["ref_logps"], ref_sums, atol=1e-4, rtol=0)
    r = _rewards(reward_run, prompts, [c for _, c in rows]).view(PROMPTS, 2)
    p_soft = torch.sigmoid(r[:, 0] - r[:, 1])
    if label == "soft":
        torch.testing.assert_close(out["p_hat"], p_soft, atol=1e-5, rtol=0)
    else:
        assert set(out["p_hat"].tolist()) <= {0.0, 1.0}
    # h from sequence sums (the online default); identity Ψ's target (Ψ(p̂) − Ψ(1 − p̂))/(2τ) = (p̂ − ½)/τ.
    ratios = torch.stack([pol.sum() - ref.sum() for pol, ref in tokens]).view(PROMPTS, 2)
    h = ratios[:, 0] - ratios[:, 1]
    expected = ((h - (out["p_hat"] - 0.5) / tau) ** 2).mean()
    loss = trainer._compute_loss(trainer.model, out)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)  # fp32 sums over ~10 tokens
    loss.backward()  # the gradient reaches the adapter through both responses
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainer.model.named_parameters() if "lora_A" in n
    )


def test_the_mixture_sampler_mixes_policy_and_reference_log_probs(tmp_path: Path, reward_run: Path) -> None:
    beta = 0.3
    model = _build(tmp_path, reward_run, "online_psipo", mixture=beta).model.eval()
    tokenizer = load_tokenizer(load_recipe(tmp_path / "recipe.yaml").model)
    rows = [tokenizer("What is 2 plus 2?\nAnswer:")["input_ids"], tokenizer("Hi")["input_ids"]]
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    mixture = MixtureLogits(model, lambda: use_adapter(model, None), mask, beta)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):  # the prompt, then one new token per call through the reference's own cache
        full = torch.cat([mask, mask.new_ones(len(rows), ids.size(1) - width)], dim=1)
        with torch.no_grad():
            scores = model(input_ids=ids, attention_mask=full, position_ids=(full.cumsum(1) - 1).clamp(min=0)).logits[
                :, -1
            ]
        got = mixture(ids, scores)
        for row in range(len(rows)):
            real = ids[row][full[row].bool()]
            policy = _plain_logps(model, real[:1], real[1:], True)
            with torch.no_grad(), use_adapter(model, None):
                ref_last = model(input_ids=real[None]).logits[0, -1].float().log_softmax(-1)
            with torch.no_grad():
                pol_last = model(input_ids=real[None]).logits[0, -1].float().log_softmax(-1)
            assert policy.numel() == len(real) - 1
            torch.testing.assert_close(got[row], (1 - beta) * pol_last + beta * ref_last, atol=1e-4, rtol=0)
        ids = torch.cat([ids, torch.randint(3, 200, (len(rows), 1), generator=generator)], dim=1)
