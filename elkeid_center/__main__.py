"""`python -m elkeid_center` = `elkeid-center`."""

import sys

from elkeid_center.cli import main

sys.exit(main())
