"""staticx with reproducible output: archive members' mtimes clamped to SOURCE_DATE_EPOCH.

staticx stores the mtimes of the temporary copies it makes (the patched program, its
helper library), so two builds of the same input differ in those few bytes. Clamping
them, as `tar --clamp-mtime --mtime=@$SOURCE_DATE_EPOCH` does, makes the executable's
sha256 depend on its inputs only. Arguments are staticx's own.
"""

import os
import sys
import tarfile

from staticx.__main__ import main

_EPOCH = int(os.environ["SOURCE_DATE_EPOCH"])
_addfile = tarfile.TarFile.addfile


def _clamped_addfile(self, tarinfo, fileobj=None):  # type: ignore[no-untyped-def]
    tarinfo.mtime = min(tarinfo.mtime, _EPOCH)
    return _addfile(self, tarinfo, fileobj)


tarfile.TarFile.addfile = _clamped_addfile  # type: ignore[method-assign]
sys.exit(main())
