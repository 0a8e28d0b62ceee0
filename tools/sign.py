"""Signing tool for release pipelines: Ed25519 keys, and the signature block appended to a
plugin, a tar.gz or the agent's deb/rpm (docs/signing.md).

    tools/sign.py keygen DIR/NAME            NAME.key (seed, 0600) and NAME.pub; prints the
                                             [[signing.keys]] entry to pin
    tools/sign.py sign --key K --name N --version V [--allow-downgrade] FILE...
                                             appends the block (replaces an existing one)
    tools/sign.py verify --pub P [--pub P2] --name N --version V FILE
                                             exit 0 if a pinned key signed FILE as N V
    tools/sign.py strip FILE...              cuts the block off (rpm refuses a package with
                                             bytes after its payload: `rpm -i` needs this)

Keys are files holding the base64 of the 32 raw bytes (the private key's seed, the public
key). Run it with the project's venv: `.venv/bin/python tools/sign.py ...`.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from elkeid_agent.signing.check import Verifier, read_block, sha256_prefix  # noqa: E402
from elkeid_agent.signing.format import BadBlock  # noqa: E402
from elkeid_agent.signing.keys import PinnedKey, Policy, decode_public_key, key_id, sign  # noqa: E402


def _read_key(path: Path) -> bytes:
    return base64.b64decode(path.read_text().strip(), validate=True)


def keygen(stem: Path) -> int:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    private_path, public_path = stem.with_suffix(".key"), stem.with_suffix(".pub")
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(base64.b64encode(seed).decode() + "\n")
    public_path.write_text(base64.b64encode(public).decode() + "\n")
    print(f"# key id {key_id(public)}: {private_path} (keep secret), {public_path}")
    print(f'[[signing.keys]]\npublic_key = "{base64.b64encode(public).decode()}"')
    return 0


def strip_file(path: Path) -> bool:
    """Cut an existing block off; False if the file has none."""
    try:
        block = read_block(path)
    except BadBlock:
        block = None
    if block is None:
        return False
    os.truncate(path, block.content_size)
    return True


def sign_file(path: Path, seed: bytes, name: str, version: str, allow_downgrade: bool) -> None:
    strip_file(path)
    size = path.stat().st_size
    block = sign(seed, name, version, size, sha256_prefix(path, size), allow_downgrade)
    with path.open("ab") as fh:
        fh.write(block)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sign.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("keygen")
    gen.add_argument("stem", type=Path)
    sig = sub.add_parser("sign")
    sig.add_argument("--key", type=Path, required=True)
    sig.add_argument("--name", required=True)
    sig.add_argument("--version", required=True)
    sig.add_argument("--allow-downgrade", action="store_true")
    sig.add_argument("files", type=Path, nargs="+")
    ver = sub.add_parser("verify")
    ver.add_argument("--pub", type=Path, action="append", required=True)
    ver.add_argument("--name", required=True)
    ver.add_argument("--version", required=True)
    ver.add_argument("file", type=Path)
    cut = sub.add_parser("strip")
    cut.add_argument("files", type=Path, nargs="+")
    args = parser.parse_args(argv)
    if args.command == "keygen":
        return keygen(args.stem)
    if args.command == "strip":
        for path in args.files:
            print(f"{path}: {'block cut off' if strip_file(path) else 'no block'}")
        return 0
    if args.command == "sign":
        seed = _read_key(args.key)
        for path in args.files:
            sign_file(path, seed, args.name, args.version, args.allow_downgrade)
            print(f"signed {path} as {args.name} {args.version}")
        return 0
    keys = [PinnedKey(decode_public_key(p.read_text().strip())) for p in args.pub]
    verdict = Verifier(Policy.ENFORCE, keys).check(args.file, args.name, args.version)
    if verdict.problem is not None:
        print(f"{args.file}: refused: {verdict.problem}", file=sys.stderr)
        return 1
    print(f"{args.file}: signed as {args.name} {args.version} "
          f"by key {verdict.block.metadata.key_id if verdict.block else '?'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
