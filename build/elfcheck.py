"""Prove what the shipped executable needs from the host's C library.

    elfcheck.py [--max-host-glibc 2.17] EXECUTABLE

Looks at every ELF the executable is or carries: the outer file, the staticx archive
(its `.staticx.archive` section: the PyInstaller executable, glibc, the loader and the
libraries staticx found) and the PyInstaller archive inside (libpython, extension
modules, the wheels' libraries). For each it reads the machine, the program
interpreter, DT_NEEDED, DT_RUNPATH/DT_RPATH and the GLIBC_* symbol versions it needs.

The verdict:
* host requirement: a static outer file (no interpreter, no DT_NEEDED) takes nothing
  from the host; otherwise its own glibc needs and those of everything it loads count.
  It must not exceed --max-host-glibc.
* inside: every DT_NEEDED of every carried ELF resolves to a carried file (else it
  would be loaded from the host), every GLIBC_* version needed is one the carried glibc
  defines, no carried library has a DT_RUNPATH (it would make the loader skip the
  staticx bundle for that library's dependencies), and all ELFs share one machine.

Runs with a Python that has pyelftools and PyInstaller (the build venv has both).
Exit status 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerDefSection, GNUVerNeedSection

STATICX_SECTION = ".staticx.archive"
_GLIBC_RE = re.compile(r"^GLIBC_(\d+(?:\.\d+)*)$")

Version = tuple[int, ...]


def _ver(text: str) -> Version:
    return tuple(int(p) for p in text.split("."))


def _fmt(v: Version | None) -> str:
    return "-" if v is None else ".".join(map(str, v))


@dataclass
class ElfInfo:
    name: str
    machine: str
    interp: str | None = None
    needed: list[str] = field(default_factory=list)
    soname: str | None = None
    runpath: str | None = None
    rpath: str | None = None
    glibc_needed: Version | None = None  # highest GLIBC_* version it references
    glibc_defined: Version | None = None  # highest GLIBC_* version it defines (libc)
    data: bytes = b""

    @property
    def static(self) -> bool:
        return self.interp is None and not self.needed


def inspect(name: str, data: bytes) -> ElfInfo:
    elf = ELFFile(io.BytesIO(data))
    info = ElfInfo(name=name, machine=elf["e_machine"], data=data)
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_INTERP":
            info.interp = seg.get_interp_name()
    for sec in elf.iter_sections():
        if isinstance(sec, DynamicSection):
            for tag in sec.iter_tags():
                kind = tag.entry.d_tag
                if kind == "DT_NEEDED":
                    info.needed.append(tag.needed)
                elif kind == "DT_SONAME":
                    info.soname = tag.soname
                elif kind == "DT_RUNPATH":
                    info.runpath = tag.runpath
                elif kind == "DT_RPATH":
                    info.rpath = tag.rpath
        elif isinstance(sec, GNUVerNeedSection):
            for _verneed, aux_iter in sec.iter_versions():
                for aux in aux_iter:
                    m = _GLIBC_RE.match(aux.name)
                    if m:
                        v = _ver(m.group(1))
                        info.glibc_needed = max(info.glibc_needed or v, v)
        elif isinstance(sec, GNUVerDefSection):
            for _verdef, aux_iter in sec.iter_versions():
                for aux in aux_iter:
                    m = _GLIBC_RE.match(aux.name)
                    if m:
                        v = _ver(m.group(1))
                        info.glibc_defined = max(info.glibc_defined or v, v)
    return info


def is_elf(data: bytes) -> bool:
    return data[:4] == b"\x7fELF"


def staticx_members(outer: bytes) -> tuple[list[ElfInfo], set[str]] | None:
    """ELFs in the staticx archive and every name (files and symlinks) it provides."""
    elf = ELFFile(io.BytesIO(outer))
    sec = elf.get_section_by_name(STATICX_SECTION)
    if sec is None:
        return None
    elves: list[ElfInfo] = []
    names: set[str] = set()
    with tarfile.open(fileobj=io.BytesIO(sec.data()), mode="r:*") as tar:
        for member in tar.getmembers():
            names.add(Path(member.name).name)
            if not member.isfile():
                continue
            fh = tar.extractfile(member)
            if fh is None:
                continue
            data = fh.read()
            if is_elf(data):
                elves.append(inspect(f"staticx:{member.name}", data))
    return elves, names


def pyinstaller_members(exe_path: Path) -> list[ElfInfo]:
    """ELFs in the PyInstaller archive of a onefile executable (empty if it has none)."""
    from PyInstaller.archive.readers import CArchiveReader, NotAnArchiveError

    try:
        archive = CArchiveReader(str(exe_path))
    except NotAnArchiveError:
        return []
    elves = []
    for name, entry in archive.toc.items():
        if entry[-1] not in ("b", "x", "d"):
            continue
        data = archive.extract(name)
        if data is not None and is_elf(data):
            elves.append(inspect(f"pyinstaller:{name}", data))
    return elves


def check(path: Path, max_host_glibc: Version, tmp: Path) -> bool:
    outer = inspect(f"outer:{path.name}", path.read_bytes())
    ok = True

    def fail(msg: str) -> None:
        nonlocal ok
        ok = False
        print(f"FAIL: {msg}")

    inner: list[ElfInfo] = []
    provided: set[str] = set()
    sx = staticx_members(outer.data)
    pyi_source = path
    if sx is not None:
        sx_elves, sx_names = sx
        inner += sx_elves
        provided |= sx_names
        # staticx stores the program under its own name; the libraries are *.so*.
        progs = [e for e in sx_elves if e.interp and ".so" not in e.name]
        prog = progs[0] if len(progs) == 1 else None
        if prog is None:
            fail("staticx archive without its program")
        else:
            # PyInstaller's reader wants a file; the prog is its own onefile executable.
            pyi_source = tmp / "staticx.prog"
            pyi_source.write_bytes(prog.data)
    pyi = pyinstaller_members(pyi_source)
    inner += pyi
    provided |= {Path(e.name.split(":", 1)[1]).name for e in inner}
    provided |= {e.soname for e in inner if e.soname}

    libcs = [e for e in inner if (e.soname or "").startswith("libc.")]
    bundled_glibc = max((e.glibc_defined for e in libcs if e.glibc_defined), default=None)

    header = "ELF (outer, staticx archive, PyInstaller archive)"
    print(f"{header:60} {'machine':10} {'GLIBC':>6}  notes")
    for e in [outer, *inner]:
        notes = []
        if e.static:
            notes.append("static")
        if e.runpath:
            notes.append(f"RUNPATH={e.runpath}")
        if e.rpath:
            # staticx's placeholder is a long run of one letter, rewritten at start.
            notes.append("RPATH=(staticx bundle)" if len(set(e.rpath)) == 1 else f"RPATH={e.rpath}")
        print(f"{e.name[-60:]:60} {e.machine:10} {_fmt(e.glibc_needed):>6}  {' '.join(notes)}")

    for e in inner:
        if e.machine != outer.machine:
            fail(f"{e.name} is {e.machine}, the executable is {outer.machine}")

    if outer.static:
        host_need: Version | None = None
        print("host: the executable is static; it loads nothing from the host")
    else:
        # Without a carried glibc, the outer file and everything it loads use the host's.
        from_host = [outer] if sx is not None else [outer, *inner]
        host_need = max((e.glibc_needed for e in from_host if e.glibc_needed), default=None)
        print(f"host: dynamic, needs GLIBC {_fmt(host_need)} from the host's libc")
        if host_need is not None and host_need > max_host_glibc:
            fail(f"needs GLIBC_{_fmt(host_need)} from the host, more than {_fmt(max_host_glibc)}")

    if sx is not None:
        print(f"inside: carried glibc defines up to GLIBC_{_fmt(bundled_glibc)}")
        if bundled_glibc is None:
            fail("the staticx archive carries no libc")
        for e in inner:
            missing = [n for n in e.needed if n not in provided]
            if missing:
                fail(f"{e.name} needs {', '.join(missing)}, which only the host could provide")
            if e.glibc_needed and bundled_glibc and e.glibc_needed > bundled_glibc:
                fail(f"{e.name} needs GLIBC_{_fmt(e.glibc_needed)} > carried glibc")
            if e.runpath:
                fail(f"{e.name} has DT_RUNPATH {e.runpath}: staticx's RPATH would not apply")
    highest = max((e.glibc_needed for e in inner if e.glibc_needed), default=None)
    print(f"inside: {len(inner)} carried ELF files, highest GLIBC needed {_fmt(highest)}")
    need_text = "nothing" if host_need is None else f"GLIBC_{_fmt(host_need)}"
    print(f"{'OK' if ok else 'FAIL'}: {path.name} needs {need_text} from the host's C library")
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("executable", type=Path)
    ap.add_argument("--max-host-glibc", default="2.17", type=_ver)
    args = ap.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="elfcheck-") as tmp:
        return 0 if check(args.executable, args.max_host_glibc, Path(tmp)) else 1


if __name__ == "__main__":
    sys.exit(main())
