"""`--push-to-hub REPO`: an exported directory (weights, tokenizer, model card) uploaded to the
Hugging Face hub through `huggingface_hub`, as one commit."""

from __future__ import annotations

import os
from pathlib import Path

from sparsefit.errors import SparsefitError, UsageError


def check_repo_id(repo_id: str) -> None:
    """A one-line refusal of a repository name the hub would refuse (checked before any work)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UsageError(f"--push-to-hub '{repo_id}' is not a hub repository name; use 'user/name'") from None
    if "/" not in repo_id:
        raise UsageError(f"--push-to-hub '{repo_id}' names no owner; use 'user/name'")


def push_to_hub(folder: str | os.PathLike, repo_id: str, private: bool = False) -> str:
    """Create `repo_id` (a model repository; kept when it exists) and upload `folder` to it; returns the
    URL of the commit. sparsefit's own bookkeeping (`.sparsefit`) stays behind. Offline
    (`HF_HUB_OFFLINE=1`), unreachable or unauthorised: one line saying so, the export left in `folder`."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    check_repo_id(repo_id)
    folder = Path(folder)
    kept = f"the export is in {folder}"
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            ignore_patterns=[".*", ".*/**"],
            commit_message="Upload sparsefit export",
        )
    except OfflineModeIsEnabled:
        raise SparsefitError(
            f"cannot push to {repo_id}: the hub is offline (HF_HUB_OFFLINE is set); unset it and rerun, or "
            f"upload later with `hf upload {repo_id} {folder}` ({kept})"
        ) from None
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        why = "not authorised: log in with `hf auth login` or set HF_TOKEN" if status in (401, 403) else str(err)
        raise SparsefitError(f"cannot push to {repo_id}: {why.splitlines()[0]} ({kept})") from None
    except OSError as err:  # no network, DNS, refused connection (httpx's errors are not OSError: below)
        raise SparsefitError(f"cannot reach the Hugging Face hub to push {repo_id}: {err} ({kept})") from None
    except Exception as err:
        if type(err).__module__.startswith(("httpx", "httpcore", "requests", "urllib3")):
            raise SparsefitError(
                f"cannot reach the Hugging Face hub to push {repo_id}: {type(err).__name__}: {err} ({kept})"
            ) from None
        raise
    return str(getattr(commit, "commit_url", commit))
