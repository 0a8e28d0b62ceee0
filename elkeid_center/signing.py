"""A publisher for the local center: a key kept in the center's directory, the plugins it
serves signed with it (docs/signing.md), and a tampered one beside them for the demo.

The real Elkeid server knows nothing of signatures: the block travels inside the uploaded
file. Here the center plays the release pipeline too, so `make demo` and `make center`
show a signed plugin accepted and a tampered one refused by an agent that pins the key.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from elkeid_agent.signing.keys import key_id, sign

KEY_FILE = "publisher.key"
PUBLIC_FILE = "publisher.pub"
#: The demo's tampered plugin: a signed copy of the first plugin with one byte changed.
TAMPERED = "tampered"


class Publisher:
    def __init__(self, directory: Path) -> None:
        """The key in `directory` (made on first use, 0600), base64 files as tools/sign.py
        writes them."""
        private, public = directory / KEY_FILE, directory / PUBLIC_FILE
        if not private.exists():
            key = Ed25519PrivateKey.generate()
            seed = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
            fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(base64.b64encode(seed).decode() + "\n")
            raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            public.write_text(base64.b64encode(raw).decode() + "\n")
        self.seed = base64.b64decode(private.read_text().strip())
        self.public_key = public.read_text().strip()
        self.key_id = key_id(base64.b64decode(self.public_key))

    def sign_file(self, source: Path, target: Path, name: str, version: str) -> None:
        data = source.read_bytes()
        block = sign(self.seed, name, version, len(data), hashlib.sha256(data).hexdigest())
        target.write_bytes(data + block)
        shutil.copymode(source, target)

    def publish(self, configs: list[dict[str, Any]], files_dir: Path, out_dir: Path,
                tampered: bool = False) -> list[dict[str, Any]]:
        """Signed copies in `out_dir` of the files the Configs name in `files_dir` (a download
        URL without a scheme), each for its Config's name and version; the Configs now name
        those copies (sha256 left empty, for `resolve_configs` to fill in). With `tampered`,
        one more Config: the first plugin signed as `tampered`, then a byte of it changed."""
        out_dir.mkdir(parents=True, exist_ok=True)
        out = []
        first: tuple[Path, dict[str, Any]] | None = None
        for config in configs:
            local = [u for u in config.get("download_urls", []) if "://" not in u]
            if not local:
                out.append(config)
                continue
            name, version = str(config["name"]), str(config["version"])
            self.sign_file(files_dir / local[0], out_dir / name, name, version)
            out.append({**config, "sha256": "", "signature": "", "download_urls": [name]})
            first = first or (files_dir / local[0], out[-1])
        if tampered and first is not None:
            source, config = first
            target = out_dir / TAMPERED
            self.sign_file(source, target, TAMPERED, str(config["version"]))
            data = bytearray(target.read_bytes())
            data[data.index(b"\n") + 3] ^= 0x20  # a letter of the first comment line
            target.write_bytes(bytes(data))
            out.append({**config, "name": TAMPERED, "download_urls": [TAMPERED]})
        return out
