"""Publishing a finished run on the Hugging Face Hub: what is uploaded, the upload, and the end of a run (card, push).

Hub tokens are never handled here: huggingface_hub reads `HF_TOKEN` or its login cache itself, so no token can end
up in the card or in any file psipo writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psipo_cli.errors import UserError
from psipo_cli.recipe.schema import Recipe
from psipo_cli.run.directory import resolve_run
from psipo_cli.tools.card import CARD_FILE, write_model_card

# Not uploaded: checkpoints (optimizer state, large and only useful to resume), the pickled TrainingArguments
# (internal to the Trainer, and unsafe to unpickle from a download) and hidden/temporary files.
PUSH_IGNORE = ["checkpoint-*", "training_args.bin", ".*", "*/.*", "*.tmp"]


def files_to_push(run_dir: Path) -> list[str]:
    """The run's files (relative, sorted) that `push_run` uploads, by the same patterns upload_folder applies."""
    from huggingface_hub.utils import filter_repo_objects

    paths = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())
    return list(filter_repo_objects(paths, ignore_patterns=PUSH_IGNORE))


def push_run(run_dir: Path, repo_id: str, private: bool = True) -> str:
    """Upload the run to the hub model repository `repo_id` (created private if missing); returns its URL.

    The token is whatever huggingface_hub finds (HF_TOKEN, then the login cache): psipo never reads or stores it.
    """
    from huggingface_hub import HfApi

    if not (run_dir / CARD_FILE).is_file():
        raise UserError("no model card (README.md) to push; finish the run first", where=str(run_dir))
    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(run_dir),
            repo_id=repo_id,
            repo_type="model",
            ignore_patterns=PUSH_IGNORE,
            commit_message=f"psipo run {run_dir.name}",
        )
    # Any failure: the hub client's error types change with its HTTP library (requests, httpx, httpx2), and whatever
    # went wrong (auth, network, offline mode, a bad repo id) the run itself is saved and the push can be retried.
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(
            f"push to {repo_id} failed ({first}); the run is saved in {run_dir}: retry with `psipo push {run_dir}`",
            where="output.hub_model_id",
        ) from None
    return str(url)


@dataclass
class Exports:
    card: Path
    pushed_to: str | None


def finish_run_exports(run_dir: Path, recipe: Recipe, summary: dict[str, Any]) -> Exports:
    """End of a run (main process only): write the model card, and push the run when output.push_to_hub."""
    card = write_model_card(run_dir, recipe, summary)
    url = None
    if recipe.output.push_to_hub and recipe.output.hub_model_id:
        url = push_run(run_dir, recipe.output.hub_model_id)
    return Exports(card, url)


def push_finished_run(target: Path, repo_id: str | None = None, private: bool = True) -> str:
    """`psipo push`: (re)write the card naming the repository, then push; returns the repository URL."""
    recipe, run_dir = resolve_run(target)
    repo = repo_id or recipe.output.hub_model_id
    if not repo:
        raise UserError("no repository to push to: pass --repo-id or set output.hub_model_id", where="--repo-id")
    named = recipe.model_copy(update={"output": recipe.output.model_copy(update={"hub_model_id": repo})})
    write_model_card(run_dir, named)
    return push_run(run_dir, repo, private)
