#!/usr/bin/python3
"""Re-signs the statement of a drun bundle keyless, with the test Sigstore instance
(tests/python/sigstore_ref.py): the same payload, so `drun verify` hashes exactly the same model
and the two runs differ only in how the signature is authenticated.

    keyless_resign.py IN.sig OUT.sig TRUSTED_ROOT.json WORKDIR
Prints the identity and identity provider to verify with, one per line."""

import base64
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "python"))
import sigstore_ref  # noqa: E402

src, out, root, work = sys.argv[1:5]
payload = base64.b64decode(json.loads(Path(src).read_text())["dsseEnvelope"]["payload"])
inst = sigstore_ref.Instance(work)
inst.write_trusted_root(root)
# Both kinds of time evidence, as the public-good instance gives today: a SET and a TSA timestamp.
sigstore_ref.write_json(inst.sign(payload, tsa="good"), out)
print(sigstore_ref.DEFAULT_IDENTITY)
print(sigstore_ref.DEFAULT_ISSUER)
