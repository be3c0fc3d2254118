"""A second English text for the benchmarks: the Lee background corpus, shipped inside the gensim wheel on PyPI.

The default text (Python's ``pydoc_data.topics``) is technical documentation. To check that an ordering of
strategies is not an artefact of that one text, ``benchmarks/peers.py --text lee`` runs the same protocol on
300 news articles from the Australian Broadcasting Corporation (Lee, Pincombe and Welsh, 2005), which gensim
ships as ``gensim/test/test_data/lee_background.cor`` (360,082 bytes, one article per line; about 75,700
tokens with the embedded model's tokenizer).

The file is read straight out of the wheel that ``pip download --no-deps gensim==4.4.0`` fetches from the
package registry (gensim is not installed or imported), checked against its SHA-256, and kept under the
hf_kvplus cache directory (``$HF_KVPLUS_CACHE_DIR``, else ``$XDG_CACHE_HOME/hf_kvplus``) in ``texts/``.
Nothing comes from the Hugging Face Hub.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from hf_kvplus.eval.disk_cache import cache_root

PACKAGE = "gensim==4.4.0"
MEMBER = "gensim/test/test_data/lee_background.cor"
SHA256 = "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb"
TEXTS = {"lee": "Lee background corpus (300 ABC news articles) from the gensim 4.4.0 wheel"}


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_lee(folder: Path | None = None) -> Path:
    """The path of the Lee corpus, downloading gensim's wheel (no dependencies) on first use.

    Raises:
        RuntimeError: pip could not download the wheel (no registry reachable), or the file's SHA-256 is not the
            one this benchmark was measured on.
    """
    folder = Path(folder) if folder is not None else cache_root() / "texts"
    path = folder / "lee_background.cor"
    if path.exists() and _digest(path.read_bytes()) == SHA256:
        return path
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                   PACKAGE, "-d", tmp]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("gensim-*.whl"))
        if done.returncode or not wheels:
            raise RuntimeError(f"could not download {PACKAGE} for its Lee corpus ({' '.join(command)}):\n"
                               f"{done.stderr.strip()[-2000:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(MEMBER)
    if _digest(data) != SHA256:
        raise RuntimeError(f"{MEMBER} in {PACKAGE} has SHA-256 {_digest(data)}, expected {SHA256}")
    folder.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def load_text(name: str) -> str:
    """The text called ``name``: ``"default"`` (``pydoc_data.topics``) or ``"lee"``.

    Raises:
        ValueError: an unknown name (the message lists the allowed ones).
    """
    if name == "default":
        from hf_kvplus.eval import load_default_text

        return load_default_text()
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}; choose from {['default', *TEXTS]}")
    return fetch_lee().read_text(encoding="utf-8")


if __name__ == "__main__":
    print(fetch_lee())
