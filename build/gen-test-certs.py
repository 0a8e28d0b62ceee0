"""Write a test PKI (CA, server `elkeid.com`, client) for packages built without CERTS_DIR.

    gen-test-certs.py DIR

Reuses a complete PKI already in DIR, so repeated builds ship the same certificates and
a local center started on DIR (elkeid-center, CenterThread(certs_dir=DIR)) accepts the
packaged agent.
"""

import sys

from elkeid_center.certs import ensure_certs

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    files = ensure_certs(sys.argv[1])
    print(files.directory)
