"""Shipping a finished run: `psipo merge`, `generate`, `chat`, the model card and what a push would upload.

The trained runs are real: the tiny model, a few steps at a high learning rate so the adapter moves the policy.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from psipo_cli.models.loading import describe_reference, inference_device, load_policy
from psipo_cli.recipe.loader import load_recipe
from psipo_cli.recipe.schema import Recipe
from psipo_cli.run.directory import read_metrics
from psipo_cli.tools.card import card_metadata, model_card
from psipo_cli.tools.generate import Generator, Sampling, chat_loop, generate_completions
from psipo_cli.tools.hub import files_to_push, finish_run_exports
from psipo_cli.tools.merge import merge_run
from psipo_cli.training.finetune import run
from tests.conftest import TINY_DATA, TINY_MODEL, assert_clean_error, tiny_recipe

FAKE_TOKEN = "hf_fakeTOKEN123"
PROMPT = "What is 8 times 5?"
# 6 steps at 2e-2: enough to move the tiny model's log-probs far from the base's (checked below).
SHORT_RUN = {"training": {"max_steps": 6, "learning_rate": 2e-2}}


def _train(tmp: Path, name: str, overrides: list[str] | None = None, **sections) -> tuple[dict, Path, Recipe]:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp / name, **SHORT_RUN, **sections)), encoding="utf-8")
    recipe = load_recipe(path, overrides)
    return run(recipe), Path(recipe.output.dir), recipe


@pytest.fixture(scope="module")
def ipo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Recipe]:
    """An IPO run trained, and its card written, with a (fake) hub token in the environment."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_TOKEN", FAKE_TOKEN)
        summary, run_dir, recipe = _train(tmp_path_factory.mktemp("ipo"), "run")
        finish_run_exports(run_dir, recipe, summary)
    return summary, run_dir, recipe


def _sequences(count: int = 4) -> list[str]:
    """Prompt + chosen of the first plain-text training pairs: text the tiny model was trained on."""
    rows = [json.loads(line) for line in (TINY_DATA / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r["prompt"] + r["chosen"] for r in rows if isinstance(r["prompt"], str)][:count]


@torch.no_grad()
def _token_logps(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """Each text's per-token log-probs of its next tokens, concatenated: (sum of lengths − 1 per text,)."""
    out = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        logits = model(input_ids=ids).logits.float()
        out.append(torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0])
    return torch.cat(out)


def _files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


# --- psipo merge ----------------------------------------------------------------------------------------------


def test_merged_model_is_plain_transformers_and_equals_the_adapter_model(ipo_run, cli, tmp_path: Path) -> None:
    _, run_dir, recipe = ipo_run
    out = tmp_path / "merged"
    result = cli("merge", run_dir, "--out", out)
    assert result.code == 0, result.err
    assert f"into {out}" in result.out and "AutoModelForCausalLM" in result.out
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name, _ in merged.named_modules()), "no peft modules left inside"
    assert type(merged).__module__.startswith("transformers.")
    tokenizer = AutoTokenizer.from_pretrained(out)
    texts = _sequences()
    policy = load_policy(recipe, run_dir)
    with torch.no_grad():
        expected = _token_logps(policy, tokenizer, texts)
        with policy.disable_adapter():
            base = _token_logps(policy, tokenizer, texts)
    got = _token_logps(merged, tokenizer, texts)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert (got - base).abs().max() > 0.05, "the adapter was applied: the merged model is not the base"
    generated = merged.generate(**tokenizer(PROMPT, return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > len(tokenizer(PROMPT)["input_ids"])


def test_merge_refuses_an_existing_directory_unless_overwrite(ipo_run, cli, tmp_path: Path) -> None:
    _, run_dir, _ = ipo_run
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text("{}", encoding="utf-8")
    assert_clean_error(cli("merge", run_dir, "--out", out), str(out), "--overwrite")
    assert [p.name for p in out.iterdir()] == ["config.json"], "left as it was"

    result = cli("merge", run_dir, "--out", out, "--overwrite", "--dtype", "bfloat16")
    assert result.code == 0, result.err
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"], "no temporary or old directory left beside it"


def test_merge_never_deletes_the_run_or_an_unrelated_directory(ipo_run, cli, tmp_path: Path) -> None:
    _, run_dir, _ = ipo_run
    assert_clean_error(cli("merge", run_dir, "--out", run_dir.parent, "--overwrite"), "no saved model")
    assert (run_dir / "adapter_model.safetensors").is_file()
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    assert_clean_error(cli("merge", run_dir, "--out", tmp_path, "--overwrite"), "refusing to delete")
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_merge_of_a_bad_run_dir_writes_nothing(cli, tmp_path: Path) -> None:
    out = tmp_path / "out" / "merged"
    assert_clean_error(cli("merge", tmp_path / "missing", "--out", out), "no such run directory")
    (tmp_path / "half").mkdir()
    assert_clean_error(cli("merge", tmp_path / "half", "--out", out), "not a psipo run directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half"], "neither --out nor a temporary sibling exists"


def test_merge_of_a_damaged_adapter_is_a_clean_error_and_writes_nothing(ipo_run, cli, tmp_path: Path) -> None:
    _, run_dir, _ = ipo_run
    damaged = shutil.copytree(run_dir, tmp_path / "damaged", ignore=shutil.ignore_patterns("checkpoint-*"))
    weights = damaged / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    out = tmp_path / "merged"
    assert_clean_error(cli("merge", damaged, "--out", out), "adapter weights are unreadable")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged"]


def test_qlora_run_merges_into_a_float_model_close_to_the_quantised_one(cli, tmp_path: Path) -> None:
    """The merged model is the original (unquantised) base + the update, exactly; the run trained on the base's
    4-bit rounding, so the merged model differs from the quantised adapter model by about the base's own
    quantisation error, which is measured here (base vs 4-bit base) as the yardstick.

    Tolerance: mean |Δ log p| per token within 1.5× that error (measured 0.049 vs 0.045 nats). At lr 5e-3 rather
    than 2e-2: a policy pushed ~5 nats/token from its base amplifies the rounding ~10× (measured 0.58 nats).
    """
    overrides = ["model.quantization=4bit", "training.learning_rate=5e-3"]
    _, run_dir, recipe = _train(tmp_path, "qlora", overrides)
    report = merge_run(run_dir, tmp_path / "merged")
    assert report.dequantised == "4bit" and report.dtype == "float32"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert all(p.dtype == torch.float32 for p in merged.parameters()), "a float model, no packed 4-bit weights"

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    texts = _sequences()
    quantised = Generator(run_dir).model  # the 4-bit policy, usable in eval mode on CPU (see export)
    unquantised = load_policy(
        recipe.model_copy(update={"model": recipe.model.model_copy(update={"quantization": "none"})}), run_dir
    )
    with torch.no_grad():
        trained = _token_logps(quantised, tokenizer, texts)
        with quantised.disable_adapter():
            quantised_base = _token_logps(quantised, tokenizer, texts)
        exact = _token_logps(unquantised, tokenizer, texts)
        with unquantised.disable_adapter():
            base = _token_logps(unquantised, tokenizer, texts)
    got = _token_logps(merged, tokenizer, texts)
    assert torch.allclose(got, exact, atol=1e-5), "the merge itself loses nothing"
    assert (got - base).abs().max() > 0.05, "the adapter was applied"
    quantisation_error = (base - quantised_base).abs().mean()
    assert (got - trained).abs().mean() <= 1.5 * quantisation_error, ((got - trained).abs().mean(), quantisation_error)
    reply = cli("generate", run_dir, "-p", PROMPT, "--temperature", "0", "--max-new-tokens", "8")
    assert reply.code == 0, reply.err
    assert reply.out.split(f"> {PROMPT}\n", 1)[1].strip(), "a completion from the 4-bit policy on CPU"


def test_reward_run_merges_into_a_sequence_classifier_with_the_same_scores(cli, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from psipo_cli.models.loading import load_tokenizer
    from psipo_cli.training.reward import load_reward_model, score

    _, run_dir, recipe = _train(tmp_path, "rm", ["objective.loss=reward"])
    result = cli("merge", run_dir, "--out", tmp_path / "merged")
    assert result.code == 0, result.err
    assert "AutoModelForSequenceClassification" in result.out
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    tokenizer = load_tokenizer(recipe.model)
    pairs = [(text, " It is 40.") for text in _sequences()]
    with torch.no_grad():
        expected = score(load_reward_model(recipe, run_dir, tokenizer), tokenizer, pairs)
        got = score(merged, tokenizer, pairs)
    assert got == pytest.approx(expected, abs=1e-5), "the trained head and the adapter are both merged"
    assert len({round(r, 4) for r in got}) > 1
    assert_clean_error(cli("generate", run_dir, "-p", PROMPT), "reward model", "psipo label")


# --- psipo generate / chat --------------------------------------------------------------------------------------


def test_generate_prints_completions_of_policy_and_reference(ipo_run, cli) -> None:
    _, run_dir, _ = ipo_run
    policy = cli("generate", run_dir, "--prompt", PROMPT, "-p", "Give the opposite of fast.", "--temperature", "0")
    assert policy.code == 0, policy.err
    blocks = policy.out.strip().split("\n\n")
    assert [b.splitlines()[0] for b in blocks] == [f"> {PROMPT}", "> Give the opposite of fast."]
    assert all(len(b.splitlines()) >= 2 and b.splitlines()[1].strip() for b in blocks), policy.out
    assert "trained policy" in policy.err and "chat template" in policy.err

    reference = cli("generate", run_dir, "--prompt", PROMPT, "--temperature", "0", "--reference")
    assert reference.code == 0, reference.err
    assert "reference policy" in reference.err and "adapter disabled" in reference.err
    assert reference.out.strip() != blocks[0], "greedy decoding differs once the adapter is off"


def test_batched_generation_gives_the_one_by_one_greedy_replies(ipo_run) -> None:
    _, run_dir, _ = ipo_run
    generator = Generator(run_dir)
    assert {p.device for p in generator.model.parameters()} == {inference_device()}
    prompts = [PROMPT, "Give the opposite of fast.", "What is 14 minus 14?", "Name a colour.", "What is 2 plus 3?"]
    assert len({len(generator.encode([{"role": "user", "content": p}], 12)[0]) for p in prompts}) > 1, "padding"
    greedy = Sampling(max_new_tokens=12, temperature=0.0)
    one_by_one = [generator.reply([{"role": "user", "content": p}], greedy) for p in prompts]
    calls = []
    generate = generator.model.generate
    generator.model.generate = lambda **kw: calls.append(kw["input_ids"].shape[0]) or generate(**kw)
    assert generate_completions(generator, prompts, greedy, batch_size=2) == one_by_one
    assert calls == [2, 2, 1], "left-padded batches of two, not one call per prompt"
    assert len(set(one_by_one)) > 1


def test_inference_device_is_the_gpu_when_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert inference_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert inference_device() == torch.device("cpu")


def test_reference_of_a_run_started_from_an_adapter_is_that_adapter(ipo_run, tmp_path: Path) -> None:
    _, start, _ = ipo_run
    _, run_dir, _ = _train(tmp_path, "continued", [f"adapter.init_from={start}", "training.max_steps=2"])
    greedy = Sampling(max_new_tokens=12, temperature=0.0)
    messages = [{"role": "user", "content": PROMPT}]
    reference = Generator(run_dir, reference=True)
    assert "starting adapter" in reference.describe()
    answer = reference.reply(messages, greedy)
    assert answer == Generator(start).reply(messages, greedy)
    assert answer != Generator(run_dir).reply(messages, greedy), "the continued policy itself has moved on"


def test_seed_makes_sampling_reproducible(ipo_run, cli) -> None:
    _, run_dir, _ = ipo_run
    args = ("generate", run_dir, "--prompt", PROMPT, "--temperature", "1.0", "--max-new-tokens", "24")
    first, again, other = cli(*args, "--seed", "3"), cli(*args, "--seed", "3"), cli(*args, "--seed", "4")
    assert first.code == again.code == other.code == 0, first.err
    assert first.out == again.out
    assert first.out != other.out, "24 tokens sampled at temperature 1 from 768: another seed gives another text"


def test_raw_prompts_skip_the_chat_template(ipo_run) -> None:
    _, run_dir, _ = ipo_run
    templated, raw = Generator(run_dir), Generator(run_dir, raw=True)
    assert templated.tokenizer.chat_template is not None, "the tiny tokenizer ships a chat template"
    messages = [{"role": "user", "content": PROMPT}]
    assert templated.render(messages) == f"<|user|>\n{PROMPT}</s><|assistant|>\n"
    assert raw.render(messages) == PROMPT


def test_chat_answers_piped_lines_until_exit(ipo_run, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    _, run_dir, _ = ipo_run
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PROMPT}\n\nAnd 9 times 3?\n/exit\nnever read\n"))
    result = cli("chat", run_dir, "--seed", "0", "--max-new-tokens", "16")
    assert result.code == 0, result.err
    assert result.out.count("assistant> ") == 2, result.out
    assert "you> " not in result.out, "no prompt is printed when stdin is a pipe"


def test_chat_keeps_the_conversation_and_reset_forgets_it(ipo_run) -> None:
    _, run_dir, _ = ipo_run
    generator = Generator(run_dir)
    seen: list[list[dict[str, str]]] = []
    answer = generator.reply

    def recording(messages: list[dict[str, str]], sampling: Sampling) -> str:
        seen.append([dict(m) for m in messages])
        return answer(messages, sampling)

    generator.reply = recording  # type: ignore[method-assign]
    lines = iter(["first", "second", "/reset", "third"])
    written: list[str] = []
    replies = chat_loop(generator, lambda: next(lines, None), written.append, Sampling(8, 0.0))
    assert replies == 3 and len(written) == 3
    assert [m["role"] for m in seen[1]] == ["user", "assistant", "user"]
    assert seen[1][0]["content"] == "first" and seen[1][1]["content"] == written[0].removeprefix("assistant> ")
    assert seen[2] == [{"role": "user", "content": "third"}]


def test_generate_refuses_a_too_large_max_new_tokens(ipo_run, cli) -> None:
    _, run_dir, _ = ipo_run
    assert_clean_error(cli("generate", run_dir, "-p", PROMPT, "--max-new-tokens", "256"), "--max-new-tokens 256")


# --- model card and push ------------------------------------------------------------------------------------------


def test_model_card_describes_the_run_and_holds_no_token(ipo_run) -> None:
    summary, run_dir, _ = ipo_run
    card = (run_dir / "README.md").read_text(encoding="utf-8")
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["base_model"] == str(TINY_MODEL) and meta["library_name"] == "peft"
    assert meta["tags"] == ["psipo", "ipo", "trl", "lora"]
    assert "license" not in meta and "datasets" not in meta, "no license is known; the data are local"
    assert "(h − 1/(2τ))²" in body and "τ = 0.5" in body and "1/(2τ) = 1" in body
    assert "token mean" in body
    assert summary["reference"] in body
    last = read_metrics(run_dir)[-1]
    assert f"| loss | {last['loss']:.4g} |" in body and f"| margin | {last['margin']:.4g} |" in body
    assert f"transformers {summary['versions']['transformers']}" in body
    assert "AutoPeftModelForCausalLM" in body and f"psipo merge {run_dir}" in body
    assert not _files_containing(run_dir, FAKE_TOKEN.encode()), "the token is in no file of the run"


def test_card_of_a_psipo_run_states_psi_labels_and_eval_metrics(tmp_path: Path) -> None:
    sections = {
        "objective": {"loss": "psipo", "psi": "logit", "tau": 2.0},
        "data": {"columns": {"label": "p_chosen"}, "eval": str(TINY_DATA / "eval.jsonl")},
    }
    recipe = Recipe.model_validate(tiny_recipe(tmp_path / "run", **sections))
    summary = {"final_train": {"step": 9, "loss": 0.25}, "final_eval": {"step": 9, "loss": 0.375}, "steps": 9}
    card = model_card(tmp_path, recipe, summary)
    assert "Ψ = logit" in card and "τ = 2" in card and "column `p_chosen`" in card
    assert "| metric | train (last log) | eval (held out, last) |" in card and "| loss | 0.25 | 0.375 |" in card
    assert "eval.jsonl" in card and describe_reference(recipe) in card


def test_card_names_hub_datasets_but_not_local_files(tmp_path: Path) -> None:
    local = Recipe.model_validate(tiny_recipe(tmp_path / "run"))
    assert "datasets" not in card_metadata(local)
    hub = tiny_recipe(tmp_path / "run", data={"train": {"path": "HuggingFaceH4/ultrafeedback_binarized"}})
    hub["model"]["quantization"] = "4bit"
    meta = card_metadata(Recipe.model_validate(hub))
    assert meta["datasets"] == ["HuggingFaceH4/ultrafeedback_binarized"]
    assert "qlora" in meta["tags"]


def test_push_uploads_the_run_but_not_checkpoints_or_internal_files(tmp_path: Path) -> None:
    for name in [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "recipe.yaml",
        "metrics.jsonl",
        "summary.json",
        "plots/loss.png",
        "training_args.bin",
        ".summary.json.tmp",
        "checkpoint-6/adapter_model.safetensors",
        "checkpoint-6/optimizer.pt",
        "plots/.margin.png.tmp",
    ]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x", encoding="utf-8")
    assert files_to_push(tmp_path) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
        "plots/loss.png",
        "recipe.yaml",
        "summary.json",
        "tokenizer.json",
    ]


def test_push_offline_is_a_clean_error_that_keeps_the_run(ipo_run, cli, tmp_path: Path) -> None:
    _, run_dir, _ = ipo_run
    copy = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoint-*"))
    assert_clean_error(cli("push", copy, "--repo-id", "someone/tiny-ipo"), "output.hub_model_id", "psipo push")
    assert 'from_pretrained("someone/tiny-ipo")' in (copy / "README.md").read_text(encoding="utf-8")
    assert_clean_error(cli("push", copy), "--repo-id")


def test_push_to_hub_needs_a_repository(cli, write_recipe) -> None:
    path = write_recipe(output={"push_to_hub": True})
    assert_clean_error(cli("validate", path), "output.hub_model_id", "push_to_hub")
    bad = write_recipe(output={"push_to_hub": True, "hub_model_id": "a b/c/d"})
    assert_clean_error(cli("validate", bad), "output.hub_model_id")
    good = write_recipe(output={"push_to_hub": True, "hub_model_id": "me/tiny-ipo"})
    assert cli("validate", good).code == 0
