"""The Python client stands alone: a platform backend imports it without the serving stack."""

from __future__ import annotations

import subprocess
import sys


def test_client_imports_no_service_code():
    code = (
        "import sys, imagegen.client\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'fastapi', 'torch')"
        " or m.startswith('imagegen.serve')))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
