"""Hub ids to local folders: `resolve` reads the Hugging Face cache first and downloads only what
is missing; a hub that does not answer fails within HF_HUB_ETAG_TIMEOUT (10 s) with the fixes."""

from __future__ import annotations

import os
import re
from pathlib import Path

from calfuse_jax.models.convert import CheckpointError

# What from_pretrained + load_tokenizer read from a hub id.
HUB_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt")


def _hub_offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


class HubUnreachableError(CheckpointError):
    """The hub endpoint did not answer; the message is complete (what, where, how long, fixes)."""


def _check_hub_answers(name: str, filename: str) -> None:
    """One HEAD request for `filename` within HF_HUB_ETAG_TIMEOUT: HubUnreachableError when the
    hub does not answer (hf_hub_download would retry silently for over six minutes); any HTTP
    answer, even an error, is left to hf_hub_download."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    try:
        import httpx2 as httpx  # huggingface_hub >= 2.0
    except ImportError:  # huggingface_hub 1.x
        import httpx

    timeout = constants.HF_HUB_ETAG_TIMEOUT
    try:
        get_hf_file_metadata(hf_hub_url(name, filename), timeout=timeout)
    except HfHubHTTPError:
        return
    except httpx.TransportError as err:
        failure = (
            f"timed out after {timeout} s without an answer (HF_HUB_ETAG_TIMEOUT={timeout}; raise "
            "it for a slow network)"
            if isinstance(err, httpx.TimeoutException)
            else f"failed ({type(err).__name__}: {err})"
        )
        raise HubUnreachableError(
            f"Could not download {name!r} from the Hugging Face hub at {constants.ENDPOINT}: the "
            f"request for {filename} {failure}. Fix: download the files once where the hub is "
            f"reachable, `hf download {name} {' '.join(HUB_FILES)}` (or in Python "
            f"`huggingface_hub.snapshot_download({name!r}, allow_patterns={list(HUB_FILES)})`), "
            "then run with HF_HUB_OFFLINE=1 to read them from the cache without any network; or "
            "pass a local CLIP folder instead of the hub id (on the command line "
            "--config.model.name=/path/to/folder)."
        ) from err


def resolve(
    path_or_hub_id: str | os.PathLike,
    required: tuple[str, ...],
    alternatives: tuple[str, ...] = (),
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Local folder for a folder path or a hub id: `required` files plus the first of
    `alternatives` that exists. The local cache is tried first, so cached ids never touch the
    network; with HF_HUB_OFFLINE=1 the network is never tried. Raises HubUnreachableError (a hub
    silent for HF_HUB_ETAG_TIMEOUT) or CheckpointError naming the files and the fixes."""
    name = str(path_or_hub_id)
    if Path(name).is_dir():
        return Path(name)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) or Path(name).exists():
        raise CheckpointError(
            f"{name!r} is neither a checkpoint folder nor a hub id "
            "like 'openai/clip-vit-base-patch16'"
        )
    try:
        return _download(name, required, alternatives, cache_dir)
    except HubUnreachableError:
        raise
    except (OSError, ValueError, RuntimeError) as err:  # hub errors derive from these
        from huggingface_hub import constants

        wanted = ", ".join(required) + (
            f" and one of {', '.join(alternatives)}" if alternatives else ""
        )
        where = cache_dir or constants.HF_HUB_CACHE
        mode = "offline (HF_HUB_OFFLINE is set)" if _hub_offline() else "online"
        raise CheckpointError(
            f"{name!r} is not a local folder, so it was looked up as a Hugging Face hub id, "
            f"{mode}, and that failed: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}\nNeeded files: {wanted}. Either "
            f"download them once with network access (they are cached under {where}), or put "
            f"them in a local folder and pass that folder's path instead of the hub id."
        ) from err


def _download(name: str, required: tuple[str, ...], alternatives: tuple[str, ...], cache_dir):
    """The snapshot folder of hub id `name` once `required` and one of `alternatives` are there."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    offline = _hub_offline()

    def fetch(filename: str) -> str:
        try:  # cache first: no network round trip for files we already have
            return hf_hub_download(name, filename, cache_dir=cache_dir, local_files_only=True)
        except LocalEntryNotFoundError:
            if offline:
                raise
        _check_hub_answers(name, filename)  # a silent hub fails here, not in hf_hub_download
        return hf_hub_download(name, filename, cache_dir=cache_dir)

    folder = Path([fetch(filename) for filename in required][0]).parent
    for filename in alternatives:
        try:
            fetch(filename)
            break
        except (EntryNotFoundError, LocalEntryNotFoundError):
            if filename == alternatives[-1]:
                raise
    return folder
