"""`psipo frontier`: the gold preference's closed forms, the data it draws, the judge, and the quick form end to end.

The quick form (`psipo frontier --quick`) trains every method for 4 steps on 48 prompts (about 25 s on 2 cores):
it proves the experiment runs through psipo's own stages and writes what the README quotes, not its findings.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.trainer.utils import add_fused_lm_head

from psipo_cli.paper.frontier import METHODS, RESPONSES_PER_STEP, Settings, method_overrides
from psipo_cli.paper.frontier_eval import Judge, preference_pairs, response_texts, sample
from psipo_cli.paper.frontier_run import plain_prompts
from psipo_cli.paper.gold import GOLD_SCALE, Estimate, GoldReward, preference, votes_for_first, win_rate
from psipo_cli.recipe.loader import load_recipe
from psipo_cli.tools.sampling import sample_responses, sampling_config
from tests.conftest import RECIPES, TINY_DATA, TINY_MODEL, assert_clean_error

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_MODEL)


@pytest.fixture(scope="module")
def gold(tokenizer) -> GoldReward:
    return GoldReward(tokenizer)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_gold_reward_is_the_mean_token_weight(tokenizer, gold):
    text = " The answer is 12."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 2
    expected = sum(float(gold.weights[i]) for i in ids) / len(ids)
    assert gold([text, ""]) == [pytest.approx(expected, abs=1e-12), float(gold.weights.min())]
    assert preference(*gold(["", " No."])) < 0.5  # an empty answer never wins against an answer
    # Frozen: a second instance has the same weights, N(0, GOLD_SCALE²) over the 768 tokens.
    assert torch.equal(GoldReward(tokenizer).weights, gold.weights)
    assert statistics.pstdev(gold.weights.tolist()) == pytest.approx(GOLD_SCALE, rel=0.1)
    assert abs(statistics.fmean(gold.weights.tolist())) < 3 * GOLD_SCALE / math.sqrt(len(gold.weights))


def test_preference_and_win_rate_closed_forms():
    assert preference(1.0, -0.5) == pytest.approx(sigmoid(1.5))
    assert preference(0.3, 0.3) == 0.5
    # σ(a) + σ(−a) = 1: any sample set against itself wins exactly half the time.
    rewards = [0.3, -1.2, 2.5, 0.0]
    assert win_rate(rewards, rewards) == pytest.approx(0.5, abs=1e-15)
    expected = statistics.fmean(sigmoid(a - b) for a in (1.0, 2.0) for b in (0.0, -1.0, 3.0))
    assert win_rate([1.0, 2.0], [0.0, -1.0, 3.0]) == pytest.approx(expected)


def test_estimate_is_the_normal_interval_over_prompts():
    # sample std of (0.2, 0.4, 0.9, 0.5) = sqrt(0.26 / 3) = 0.29439; 1.96 × 0.29439 / sqrt(4) = 0.28850
    estimate = Estimate.of([0.2, 0.4, 0.9, 0.5])
    assert estimate.mean == pytest.approx(0.5)
    assert estimate.half_width == pytest.approx(0.28850, abs=1e-5)
    assert Estimate.of([0.7]) == Estimate(0.7, 0.0)


def test_annotators_follow_the_gold_probability():
    generator = torch.Generator().manual_seed(0)
    assert {votes_for_first(0.7, 1, generator) for _ in range(50)} == {0, 1}
    draws = 20_000
    assert votes_for_first(0.7, draws, generator) / draws == pytest.approx(0.7, abs=0.015)
    assert votes_for_first(0.0, 10, generator) == 0 and votes_for_first(1.0, 10, generator) == 10


def test_preference_pairs_hard_and_soft(tokenizer, gold):
    eos = [tokenizer.eos_token_id]
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"] + eos  # noqa: E731
    texts = [" It is 12.", " Go away.", " That would be slow.", " No."]
    pairs = [[encode(texts[0]), encode(texts[1])], [encode(texts[2]), encode(texts[3])]]
    pairs += [[encode(" Same."), encode(" Same.")], [eos, encode(" Fine.")]]  # identical, empty: left out
    draw = preference_pairs(["p0", "p1", "p2", "p3"], pairs, tokenizer, gold, soft=16, seed=0)
    assert (draw.identical, draw.empty, len(draw.hard), len(draw.soft)) == (1, 1, 2, 2)
    for rows, count in ((draw.hard, 1), (draw.soft, 16)):
        for row, (a, b) in zip(rows, (texts[:2], texts[2:]), strict=True):
            assert {row["chosen"], row["rejected"]} == {a, b}
            assert row["votes_total"] == count and row["p_chosen"] == row["votes_chosen"] / count >= 0.5
            r_chosen, r_rejected = gold([row["chosen"], row["rejected"]])
            assert row["p_gold"] == pytest.approx(sigmoid(r_chosen - r_rejected))
    assert all(row["p_chosen"] == 1.0 for row in draw.hard)  # one annotator: p̂ ∈ {0, 1}, the winner is chosen


def test_hard_labels_are_as_noisy_as_the_gold_preference(tokenizer, gold):
    """One annotator per pair: the better response is `chosen` with probability p*, not always (2,000 draws)."""
    eos = [tokenizer.eos_token_id]
    a, b = " It is 12.", " Go away."
    pair = [
        tokenizer(a, add_special_tokens=False)["input_ids"] + eos,
        tokenizer(b, add_special_tokens=False)["input_ids"] + eos,
    ]
    draw = preference_pairs(["p"] * 2000, [pair] * 2000, tokenizer, gold, soft=16, seed=1)
    p_a = preference(*gold([a, b]))
    assert 0.05 < p_a < 0.95  # a pair the gold does not decide outright
    assert sum(row["chosen"] == a for row in draw.hard) / 2000 == pytest.approx(p_a, abs=0.035)
    assert statistics.fmean(row["p_chosen"] for row in draw.soft) == pytest.approx(max(p_a, 1 - p_a), abs=0.03)


def test_batched_sampling_keeps_each_prompt_its_own_responses(tokenizer):
    """Prompts of several lengths, batched by length: each response goes back to the prompt it continued."""

    class Echo:  # stands in for `generate` only: appends each row's first two tokens and EOS
        device = torch.device("cpu")

        def parameters(self):
            yield torch.zeros(1)

        def generate(self, input_ids, attention_mask, generation_config):
            assert bool(attention_mask.all())  # no padding in a batch
            eos = torch.full((len(input_ids), 1), tokenizer.eos_token_id)
            return torch.cat([input_ids, input_ids[:, :2], eos], dim=1)

    prompts = [[5, 6, 7], [8, 9], [10, 11, 12], [13, 14, 15, 16], [17, 18]]
    groups = sample_responses(Echo(), prompts, 3, sampling_config(tokenizer, 4), max_rows=6)
    assert groups == [[[*p[:2], tokenizer.eos_token_id]] * 3 for p in prompts]


def test_sampling_and_the_judge_on_the_reference(tokenizer, gold):
    """π_ref judged against itself: KL exactly 0 (one model, both log-probs), win rate ½ within its interval."""
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL).eval()
    add_fused_lm_head(model)
    prompts = [tokenizer(text)["input_ids"] for text in plain_prompts(TINY_DATA / "eval.jsonl", 12)]
    assert len({len(p) for p in prompts}) > 1  # several length groups are batched
    responses = sample(model, tokenizer, prompts, 3, 10, seed=0)
    assert [len(group) for group in responses] == [3] * len(prompts)
    for response in (r for group in responses for r in group):
        assert len(response) == 10 or response[-1] == tokenizer.eos_token_id
        assert tokenizer.eos_token not in response_texts(tokenizer, [response])[0]
    assert sample(model, tokenizer, prompts, 3, 10, seed=0) == responses  # seeded
    judge = Judge.for_reference(model, tokenizer, gold, prompts, 8, 10, seed=0, reference_seed=1)
    recipe = load_recipe(RECIPES / "tiny-ipo.yaml", [])
    judged = judge(model, contextlib.nullcontext, recipe).as_dict()  # no adapter: the model is its own reference
    assert judged["kl"] == {"mean": 0.0, "ci95": 0.0}
    assert abs(judged["win_rate"]["mean"] - 0.5) < judged["win_rate"]["ci95"] < 0.1
    assert judged["empty"] == 0.0 and 1 < judged["length"] <= 10


def test_the_judge_measures_a_moved_policy(tokenizer, gold):
    """A LoRA adapter with random B: KL(π‖π_ref) estimated positive (a swapped sign would read negative), and
    equal to the mean of log π − log π_ref over π's own samples computed here from plain logits."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL).eval()
    add_fused_lm_head(base)
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for name, weight in policy.named_parameters():
        if "lora_B" in name:
            weight.data.normal_(0, 0.5)
    policy.eval()
    prompts = [tokenizer(text)["input_ids"] for text in plain_prompts(TINY_DATA / "eval.jsonl", 4)]
    judge = Judge.for_reference(policy, tokenizer, gold, prompts, 4, 6, seed=3, reference_seed=4)
    recipe = load_recipe(RECIPES / "tiny-ipo.yaml", [])
    judged = judge(policy, policy.disable_adapter, recipe)
    assert min(judged.kl) > 0
    responses = sample(policy, tokenizer, prompts, 4, 6, seed=3)  # the judge's own draw (same seed)
    expected = []
    for prompt, group in zip(prompts, responses, strict=True):
        ratios = []
        for response in group:
            ids = torch.tensor([prompt + response])
            with torch.no_grad():
                logp = _response_logp(policy, ids, len(prompt))
                with policy.disable_adapter():
                    logp_ref = _response_logp(policy, ids, len(prompt))
            ratios.append(logp - logp_ref)
        expected.append(statistics.fmean(ratios))
    assert judged.kl == pytest.approx(expected, abs=1e-4)


def _response_logp(model, ids: torch.Tensor, prompt_length: int) -> float:
    """Σ log p(y_t | x, y_<t) over the response tokens, from the model's full logits."""
    logits = model(input_ids=ids).logits[0, prompt_length - 1 : -1]
    return float(torch.log_softmax(logits.float(), -1).gather(1, ids[0, prompt_length:, None]).sum())


def test_every_method_gets_the_same_budget(tmp_path):
    """Same steps, learning rate and schedule, seed, τ and sampled responses per step for every method; h from
    sequence log-probs wherever the objective has one (rlhf's KL is per sequence by construction)."""
    settings = Settings.defaults()
    seen = set()
    for name, method in METHODS.items():
        recipe = load_recipe(RECIPES / method.recipe, method_overrides(settings, name, 0.05, 1, tmp_path))
        training = recipe.training
        seen.add((training.max_steps, training.learning_rate, training.lr_scheduler_type, training.seed))
        assert recipe.objective.tau == 0.05 and recipe.data.eval is None
        k = recipe.rollout.responses_per_prompt if recipe.rollout else 2
        assert training.per_device_train_batch_size * k == RESPONSES_PER_STEP
        assert recipe.adapter.r == 8 and recipe.adapter.dropout == 0.0
        if recipe.objective.loss != "rlhf":
            assert recipe.objective.logps == "sum"
    assert seen == {(settings.steps, settings.learning_rate, "constant", 1)}


def test_command_line_of_the_settings():
    assert Settings.defaults().command() == "psipo frontier"
    assert Settings.defaults(quick=True).command() == "psipo frontier --quick"
    custom = Settings.from_options(False, taus=[0.1, 0.5], seeds=3, steps=None)
    assert custom.command() == "psipo frontier --tau 0.1 --tau 0.5 --seeds 3"


def test_quick_frontier_end_to_end(cli, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    result = cli("frontier", "--quick", "--out", str(out), "--work", str(work))
    assert result.code == 0, result.err
    doc = json.loads((out / "frontier.json").read_text())
    assert doc["command"] == "psipo frontier --quick"
    assert {(run["method"], run["tau"]) for run in doc["runs"]} == {(m, 0.05) for m in METHODS}
    for run in doc["runs"]:
        assert [point["step"] for point in run["curve"]] == [0, 2, 4]
        assert run["curve"][0]["kl"] == {"mean": 0.0, "ci95": 0.0}  # step 0 is π_ref itself
        assert all(0 < point["win_rate"]["mean"] < 1 for point in run["curve"])
        assert len(run["curve"][-1]["win_rate"]["per_prompt"]) == 6  # the final policy keeps its per-prompt values
        assert len(run["train_log"]) == 4
        if run["method"] != "rlhf":  # the preference losses log their margin h; RLOO has none
            assert all("margin" in entry for entry in run["train_log"])
    # Hard data is the paper's regime (p̂ = 1 after ordering); the soft control's labels are not all deterministic.
    hard = [json.loads(line) for line in (work / "seed0" / "hard.jsonl").read_text().splitlines()]
    assert {row["p_chosen"] for row in hard} == {1.0} and len(hard) == doc["data"]["0"]["pairs"]
    assert 0.5 < doc["data"]["0"]["soft_p_hat_mean"] < 1 and doc["data"]["0"]["soft_deterministic_share"] < 1
    labelled = [json.loads(line) for line in (work / "seed0" / "labelled.jsonl").read_text().splitlines()]
    assert all(0 < row["p_hat"] < 1 for row in labelled)
    # Each method trained its own stage on its own data.
    for name, method in METHODS.items():
        recipe = load_recipe(RECIPES / method.recipe, next(r["overrides"] for r in doc["runs"] if r["method"] == name))
        assert recipe.data.train.path.endswith(f"{method.data}.jsonl")
        assert (recipe.rollout is not None) == method.rollout
    table = (out / "frontier.md").read_text()
    assert "| DPO | 0.05 |" in table and "| online IPO | 0.05 |" in table
    for name in ("frontier.png", "frontier-training.png"):
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--method", "ppo"), "unknown method 'ppo'"),
        (("--tau", "0"), "every τ must be a positive number"),
        (("--tau", "nan"), "every τ must be a positive number"),
        (("--tau", "0.1", "--tau", "0.1"), "given twice"),
        (("--method", "dpo", "--method", "dpo"), "given twice"),
        (("--seeds", "0"), "--seeds: must be at least 1"),
        (("--steps", "0"), "--steps: must be at least 1"),
        (("--workers", "0"), "--workers: must be at least 1"),
    ],
)
def test_bad_options_are_one_line(cli, tmp_path, args, fragment):
    assert_clean_error(cli("frontier", "--quick", "--out", str(tmp_path), *args), fragment)


def test_a_used_work_folder_is_refused(cli, tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("not a folder")
    for work in ("work", "work/keep.txt"):
        result = cli("frontier", "--quick", "--out", str(tmp_path), "--work", str(tmp_path / work))
        assert_clean_error(result, "not an empty folder")
    assert_clean_error(cli("frontier", "--quick", "--out", str(tmp_path / "file")), "is not a folder")
    assert (tmp_path / "work" / "keep.txt").read_text() == "mine"
