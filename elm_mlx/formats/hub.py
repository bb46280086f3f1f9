"""Resolve a local directory or a Hugging Face hub id to a local directory.

A local path always wins. A hub id is looked up in the local cache first, so a
model that was downloaded once opens offline and without a network round trip.
Only then is the hub asked, once, with a short timeout; with `HF_HUB_OFFLINE`
set, or with no network, the answer is a one-line error naming the id within
about a second instead of huggingface-hub's retries. Only data files are ever
fetched (never `*.py`: no code from a model repo runs here).
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path

# Files a model source may need; weights in .bin form only when a repo has no safetensors.
MODEL_FILES = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "tokenizer.model",
    "generation_config.json",  # sampling defaults, carried into converted directories
]
TOKENIZER_FILES = ["tokenizer.model"]
# Seconds to wait for the hub's first answer before calling the hub unreachable.
HUB_TIMEOUT = 3.0

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class HubError(FileNotFoundError):
    """A hub id that cannot be resolved to a local directory (offline, unknown, gated)."""


def is_repo_id(name: str) -> bool:
    """True for `owner/name` strings that are not explicit paths (`./x`, `/x`, `~/x`)."""
    return bool(_REPO_ID.fullmatch(name)) and ".." not in name


def resolve(
    path_or_id: str | Path,
    *,
    allow_patterns: list[str] = MODEL_FILES,
    required: tuple[str, ...] = ("config.json", "*.safetensors|pytorch_model*.bin"),
    revision: str | None = None,
) -> Path:
    """A local path as is, or the local snapshot of hub id `path_or_id` (downloaded if needed).

    A cached snapshot counts only if each of `required` (fnmatch patterns, `|` for
    alternatives) matches one of its files; otherwise the hub is asked.
    """
    path = Path(path_or_id).expanduser()
    if path.exists():
        return path
    name = str(path_or_id)
    if not is_repo_id(name):
        raise FileNotFoundError(f"{name} not found: no such file or directory")
    cached = _from_cache(name, allow_patterns, revision)
    if cached is not None and _has(cached, required):
        return cached
    if _offline():
        raise HubError(
            f"{name} is not a local directory and not in the Hugging Face cache, "
            "and HF_HUB_OFFLINE is set: download it once with network access, or pass a local path"
        )
    return _download(name, allow_patterns, revision)


def _has(path: Path, required: tuple[str, ...]) -> bool:
    names = [p.name for p in path.iterdir()]
    return all(
        any(fnmatch.fnmatchcase(n, alt) for n in names for alt in pattern.split("|"))
        for pattern in required
    )


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return env or bool(constants.HF_HUB_OFFLINE)


def _from_cache(repo_id: str, allow_patterns: list[str], revision: str | None) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id, revision=revision, allow_patterns=allow_patterns, local_files_only=True
        )
    except Exception:  # not cached, or cached incompletely: ask the hub
        return None
    return Path(path)


def _download(repo_id: str, allow_patterns: list[str], revision: str | None) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    try:
        info = HfApi().model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT)
        files = [s.rfilename for s in info.siblings or []]
        if any(f.endswith(".safetensors") for f in files):
            allow_patterns = [p for p in allow_patterns if ".bin" not in p]
        # Pinning the resolved commit skips a second metadata request.
        return Path(snapshot_download(repo_id, revision=info.sha, allow_patterns=allow_patterns))
    except Exception as e:
        raise HubError(f"cannot fetch {repo_id} from the Hugging Face hub: {_reason(e)}") from None


def _reason(error: Exception) -> str:
    """One line saying why a hub request failed, and what to do about it."""
    from huggingface_hub.utils import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(error, GatedRepoError):
        return "the repo is gated: accept its license on huggingface.co and run `hf auth login`"
    if isinstance(error, RepositoryNotFoundError):
        return "no such repo (or it is private: run `hf auth login`)"
    if isinstance(error, RevisionNotFoundError):
        return "no such revision"
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{text[:200]} (no network? set HF_HUB_OFFLINE=1 to use only the local cache)"
