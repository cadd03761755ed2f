"""A Hugging Face model or tokenizer by name, found on this machine only: a local folder
(what ``save_pretrained`` writes), or a snapshot in the Hugging Face cache
(``$HF_HOME/hub``). kdrun never downloads: a name that is not here is one line saying
how to bring it, before anything trains. Used by ``hf_lm`` (kdrun/models/hubs/hf_lm.py)
and by ``text_lm``'s ``tokenizer`` (kdrun/data/text.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from kdrun.errors import UserError
from kdrun.store.files import cached_sha256


def local_snapshot(name: str, key: str) -> Path:
    """The folder holding ``name``: itself when it is a folder, else its snapshot in the
    Hugging Face cache; a UserError naming ``key`` when neither is on this machine."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:
        raise UserError(f"{key}={name} needs transformers: pip install 'kdrun[lm]'") from e
    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        from huggingface_hub.constants import HF_HUB_CACHE

        raise UserError(f"{key}={name}: not a local folder, and not in the Hugging Face cache "
                        f"({HF_HUB_CACHE}); kdrun never downloads: on a machine with network "
                        f"run `hf download {name}` and copy the cache here (or set HF_HOME), "
                        "or give the folder save_pretrained wrote") from None


def weights_sha256(folder: Path) -> str:
    """One hash of every weights file of a snapshot (what a stage key holds): of their
    names and contents' hashes, each file hashed once per process while unchanged."""
    paths = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    return hashlib.sha256("".join(f"{p.name}:{cached_sha256(p)}\n" for p in paths)
                          .encode()).hexdigest()
