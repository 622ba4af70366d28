"""`imagegen provenance check`: a shared 1024 px image (JPEG 70, half size) still finds its request, for the
tenant that rendered it only."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from imagegen.cli import app
from imagegen.ids import InvalidTenantIdError
from imagegen.serve.store import ServeStore
from tests.provenance.helpers import audit_row, encode
from tests.test_cli import run_cli


@pytest.fixture
def audited(stamped_1024, isolated_home):
    """The stamped photo's audit row in this home's serve store, owned by tenant ``acme``."""
    with ServeStore.open() as store:
        store.add_audit([audit_row(stamped_1024.image_id, stamped_1024.request_id, "acme")])
    return stamped_1024


def check(path, *options: str) -> dict:
    result = CliRunner().invoke(app, ["provenance", "check", str(path), *options])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("shared", ["jpeg70", "resize0.5"])
def test_check_reaches_the_request_after_sharing(audited, tmp_path, shared):
    image = audited.image
    if shared == "jpeg70":
        path = tmp_path / "shared.jpg"
        path.write_bytes(encode(image, "JPEG", quality=70))
    else:
        path = tmp_path / "shared.png"
        path.write_bytes(encode(image.resize((512, 512), Image.Resampling.LANCZOS)))
    report = check(path, "--tenant", "acme")
    assert report["watermark"]["found"] and report["watermark"]["tag"] == audited.image_id[:8]
    assert report["survived"] == ["watermark"]  # re-encoded: manifest and text chunks are gone
    assert report["audit_reached"] and report["request_id"] == audited.request_id
    assert report["audit"][0]["image_id"] == audited.image_id
    # another tenant learns nothing about acme's render
    other = check(path, "--tenant", "globex")
    assert other["watermark"]["found"] and other["audit"] == [] and other["request_id"] is None
    assert not other["audit_reached"]


def test_check_of_the_served_file_reports_every_layer_and_the_signer(audited, tmp_path):
    path = tmp_path / "served.png"
    path.write_bytes(audited.png)
    result = CliRunner().invoke(app, ["provenance", "check", str(path), "--tenant", "acme"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["survived"] == ["manifest", "text_chunks", "watermark"]
    assert report["manifest"]["valid"] and report["signer"].startswith("development signer")
    assert report["request_id"] == audited.request_id
    assert "layers that survived: manifest, text_chunks, watermark" in result.stderr
    assert "development signer" in result.stderr


def test_check_refuses_bad_input_in_one_line(tmp_path, isolated_home):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    proc = run_cli("provenance", "check", str(junk))
    assert proc.returncode == 2 and "is not an image" in proc.stderr and "Traceback" not in proc.stderr
    result = CliRunner().invoke(app, ["provenance", "check", str(junk), "--tenant", "../etc"])
    assert isinstance(result.exception, InvalidTenantIdError)  # main() prints it as one line, exit 2


def test_check_of_a_cut_download_reports_what_is_left(audited, tmp_path):
    """A JPEG cut off near its end (an interrupted download) is checked, not a traceback: the
    damage is named and the watermark still reaches the request."""
    served = audited.image
    whole = encode(served, "JPEG", quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(whole[: len(whole) * 97 // 100])
    result = CliRunner().invoke(app, ["provenance", "check", str(path), "--tenant", "acme"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["damaged"] and "damaged pixel stream" in result.stderr
    assert report["watermark"]["found"] and report["watermark"]["tag"] == audited.image_id[:8]
    assert report["audit_reached"] and report["request_id"] == audited.request_id
