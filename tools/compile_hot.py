"""Compile the hot modules with mypyc, in place (the .so lands beside its source).

    python tools/compile_hot.py [--required]

`make setup` runs it: without a C compiler the pure-Python modules stay in use, with a
warning. build/build-in-root.sh runs it with --required: a shipped executable is compiled.
The generated C and the objects go to `.hot-build/` (removed afterwards), never into build/.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOT = ["elkeid_agent/framescan.py"]
#: mypyc's runtime library for all of HOT, found by build/pyinstaller.spec. Without a name,
#: mypyc names it after the module when there is one, and after a hash at the top level
#: (outside the package) when there are several.
GROUP = "elkeid_agent.hot"
#: Relative to the source tree: the generated C and the objects, removed afterwards.
BUILD_DIR = ".hot-build"


def compile_hot(root: Path) -> None:
    from mypyc.build import mypycify
    from setuptools import Distribution

    os.chdir(root)  # mypyc names the modules after their paths from here
    # A build of an older source must never answer for this one: if this compile fails,
    # the source runs (and the tests say it is not compiled).
    for source in HOT:
        for stale in Path(source).parent.glob(Path(source).stem + "*.so"):
            stale.unlink()
    for stale in Path("elkeid_agent").glob("*__mypyc.*.so"):
        stale.unlink()
    # A fixed directory, not a random one: its path ends up in the objects' debug info, and
    # the build must be reproducible (tests/package: same checkout, same bytes).
    tmp = BUILD_DIR
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # A bare Distribution: setup() would also read pyproject.toml, which is not about this.
        dist = Distribution({
            "name": "elkeid-agent-hot",
            "ext_modules": mypycify(HOT, target_dir=f"{tmp}/c", opt_level="3",
                                    group_name=GROUP),
        })
        dist.script_args = ["-q", "build_ext", "--inplace", "--build-temp", f"{tmp}/o",
                            "--build-lib", f"{tmp}/lib"]
        dist.parse_command_line()
        dist.run_commands()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--required", action="store_true", help="fail if it cannot compile")
    parser.add_argument("--root", type=Path, default=ROOT, help="the source tree")
    args = parser.parse_args()
    try:
        compile_hot(args.root.resolve())
    except (Exception, SystemExit) as exc:  # setuptools exits on compiler errors
        if args.required:
            raise
        print(f"compile_hot: {exc!r}; the pure-Python {', '.join(HOT)} stays in use "
              "(correct, slower)", file=sys.stderr)


if __name__ == "__main__":
    main()
