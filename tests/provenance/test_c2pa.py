"""The signed C2PA manifest: keygen's development pair, configured and development signers, PNG and JPEG,
validation with ``c2pa-python``, and failure after the pixels are edited."""

from __future__ import annotations

import io
import json

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from imagegen import provenance, samples
from imagegen.cli import app
from imagegen.provenance import c2pa_embed, keys, manifest
from imagegen.provenance.manifest import IPTC_AI_GENERATED, read_manifest
from imagegen.settings import get_settings
from tests.provenance.edits import edit_jpeg_pixels, edit_png_pixels
from tests.provenance.helpers import decode, encode, stamp_photo
from tests.test_cli import run_cli

MIME = {"png": "image/png", "jpeg": "image/jpeg"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict:
    """A pair made by `imagegen provenance keygen` (the CLI, as an operator runs it)."""
    out = tmp_path_factory.mktemp("c2pa") / "signer"
    result = CliRunner().invoke(app, ["provenance", "keygen", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "DEVELOPMENT" in result.output and "IMAGEGEN_C2PA_CERT=" in result.output
    return {"out": out, "output": result.output}


@pytest.fixture
def configured(pair, isolated_home, monkeypatch):
    monkeypatch.setenv("IMAGEGEN_C2PA_CERT", str(pair["out"] / keys.CHAIN_FILE))
    monkeypatch.setenv("IMAGEGEN_C2PA_KEY", str(pair["out"] / keys.KEY_FILE))
    monkeypatch.setenv("IMAGEGEN_C2PA_TRUST", str(pair["out"] / keys.CA_FILE))
    get_settings.cache_clear()
    yield pair["out"]
    get_settings.cache_clear()


def test_keygen_makes_a_development_ca_and_a_leaf_validators_accept(pair):
    chain = x509.load_pem_x509_certificates((pair["out"] / keys.CHAIN_FILE).read_bytes())
    ca = x509.load_pem_x509_certificate((pair["out"] / keys.CA_FILE).read_bytes())
    leaf = chain[0]
    assert len(chain) == 2 and chain[1] == ca
    assert leaf.issuer == ca.subject != leaf.subject  # not self-signed
    for cert in (leaf, ca):
        assert "DEVELOPMENT" in cert.subject.rfc4514_string()
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.EMAIL_PROTECTION in usages and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in usages
    assert (pair["out"] / keys.KEY_FILE).stat().st_mode & 0o077 == 0
    # never over an existing pair: one line, exit 2
    again = run_cli("provenance", "keygen", "--out", str(pair["out"]))
    assert again.returncode == 2 and "already holds" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_configured_signer_signs_png_and_jpeg_and_an_edit_fails_validation(configured, fmt):
    stamped = stamp_photo(samples.astronaut(), fmt=fmt)
    manifest = read_manifest(stamped.png, MIME[fmt])
    assert manifest["present"] and manifest["valid"], manifest
    assert manifest["state"] == "Trusted" and manifest["trusted"] and manifest["failures"] == []
    assert manifest["trust_anchors"] == ["configured trust anchors"]
    assert "imagegen development signer" in manifest["signer"]["common_name"]
    assert manifest["digital_source_type"] == IPTC_AI_GENERATED
    assert manifest["request_id"] == stamped.request_id and manifest["image_id"] == stamped.image_id
    assert manifest["character"] == "mia" and manifest["character_version"] == 2
    assert manifest["preset"] == "tiny-flux" and manifest["method"] == "pulid-flux"
    assert manifest["generator"]["name"] == "imagegen" and manifest["generator"]["version"]
    assert stamped.record["c2pa"]["signer"] == "configured"
    assert not (configured.parent / "home" / "provenance").exists()  # no development pair was made
    assert c2pa_embed.holds_gil()  # signing never waits on other threads for the GIL (c2pa_embed)

    edited = (edit_png_pixels if fmt == "png" else edit_jpeg_pixels)(stamped.png)
    broken = read_manifest(edited, MIME[fmt])
    assert broken["present"] and not broken["valid"] and broken["state"] == "Invalid", broken
    assert any("mismatch" in code for code in broken["failures"]), broken["failures"]
    report = provenance.check_image(edited)
    assert report["layers"]["manifest"] is False and report["manifest"]["state"] == "Invalid"
    if fmt == "png":  # one row edited: the metadata and the watermark are still there
        assert report["survived"] == ["text_chunks", "watermark"]


def _hash_assertion(data: bytes, mime: str) -> dict:
    import c2pa

    with c2pa.Context(settings=c2pa.Settings.from_dict({"verify": {"verify_trust": False}})) as context:
        reader = c2pa.Reader.try_create(mime, io.BytesIO(data), None, context)
        with reader:
            store = json.loads(reader.detailed_json())
    return store["manifests"][store["active_manifest"]]["assertion_store"]["c2pa.hash.data"]


def _without_jfif(jpeg: bytes) -> bytes:
    assert jpeg[2:4] == b"\xff\xe0"
    return jpeg[:2] + jpeg[4 + int.from_bytes(jpeg[4:6], "big") :]


@pytest.mark.parametrize(
    ("fmt", "strip_jfif", "expected_at"),
    [("png", False, 33), ("jpeg", False, 20), ("jpeg", True, 2)],
    ids=["png-after-IHDR", "jpeg-after-JFIF", "jpeg-without-JFIF"],
)
def test_the_manifest_sits_where_its_hash_excludes_it_and_every_other_byte_is_bound(
    configured, fmt, strip_jfif, expected_at
):
    """Signing by data hash places the manifest itself (after a PNG's IHDR, after a JPEG's SOI and JFIF APP0, as
    c2pa-rs does): the exclusion is exactly the manifest's bytes, the rest of the file is the unsigned one byte
    for byte, a change to any of it fails validation, and bytes that are no PNG / JPEG are refused unsigned."""
    photo = samples.astronaut().resize((96, 96))
    unsigned = encode(photo, "PNG" if fmt == "png" else "JPEG")
    if strip_jfif:
        unsigned = _without_jfif(unsigned)
    record = {"image_id": "0123abcd" * 4, "request_id": "placement", "preset": "tiny-flux", "method": "none"}
    signed = manifest.sign(unsigned, fmt, record)
    exclusions = _hash_assertion(signed, MIME[fmt])["exclusions"]
    assert len(exclusions) == 1 and exclusions[0]["start"] == expected_at
    length = exclusions[0]["length"]
    assert signed[:expected_at] + signed[expected_at + length :] == unsigned
    assert read_manifest(signed, MIME[fmt])["state"] == "Trusted"
    assert decode(signed).size == (96, 96)  # still an image every decoder opens
    tampered = bytearray(signed)
    tampered[-3] ^= 0x01  # a byte after the manifest (the IEND chunk / the JPEG scan)
    assert read_manifest(bytes(tampered), MIME[fmt])["state"] == "Invalid"
    with pytest.raises(c2pa_embed.ManifestPlacementError, match="not a PNG"):
        manifest.sign(b"GIF89a" + unsigned[6:], "png", record)


def test_a_manifest_c2pa_refuses_raises_its_error_and_the_next_signature_is_fine(configured):
    """The native calls of a signature report c2pa's own error (as c2pa-python raises it), free what they made,
    and leave the thread's signer usable."""
    import c2pa

    signing = manifest._thread_signing(keys.signer_material())
    unsigned = encode(samples.astronaut().resize((32, 32)))
    refused = {"assertions": "not a list"}
    with pytest.raises(c2pa.C2paError, match="expected a sequence"):
        c2pa_embed.sign_into(signing.context, signing.signer, signing.reserve_size, refused, unsigned, "image/png")
    record = {"image_id": "4567cdef" * 4, "request_id": "after-error", "preset": "tiny-flux", "method": "none"}
    assert read_manifest(manifest.sign(unsigned, "png", record), "image/png")["state"] == "Trusted"


def test_without_trust_the_signature_is_valid_but_not_trusted(pair, isolated_home, monkeypatch):
    monkeypatch.setenv("IMAGEGEN_C2PA_CERT", str(pair["out"] / keys.CHAIN_FILE))
    monkeypatch.setenv("IMAGEGEN_C2PA_KEY", str(pair["out"] / keys.KEY_FILE))
    get_settings.cache_clear()
    stamped = stamp_photo(samples.astronaut())
    manifest = read_manifest(stamped.png, "image/png")
    assert manifest["valid"] and manifest["state"] == "Valid" and not manifest["trusted"]
    assert manifest["trust_anchors"] == []


def test_development_signer_when_none_is_configured(isolated_home):
    stamped = stamp_photo(samples.astronaut())
    assert stamped.record["c2pa"]["signer"] == "development"
    assert (isolated_home / "provenance" / "dev-signer" / keys.CHAIN_FILE).is_file()
    report = provenance.check_image(stamped.png)
    assert report["signer"].startswith(provenance.DEVELOPMENT_SIGNER + ":")
    assert report["manifest"]["state"] == "Trusted"  # by this home's development CA, and says so
    assert report["manifest"]["trust_anchors"] == ["development CA of this IMAGEGEN_HOME"]
    # made once: a second stamp signs with the same pair
    chain = (isolated_home / "provenance" / "dev-signer" / keys.CHAIN_FILE).read_bytes()
    stamp_photo(samples.astronaut())
    assert (isolated_home / "provenance" / "dev-signer" / keys.CHAIN_FILE).read_bytes() == chain


def test_half_a_signer_or_a_wrong_file_is_refused(isolated_home, tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGEGEN_C2PA_CERT", str(tmp_path / "chain.pem"))
    get_settings.cache_clear()
    with pytest.raises(keys.SignerConfigError, match="IMAGEGEN_C2PA_KEY is unset"):
        keys.load_signer()
    # `imagegen serve` refuses it before Ray starts (main() prints it as one line, exit 2)
    result = CliRunner().invoke(app, ["serve", "--port", "1"])
    assert isinstance(result.exception, keys.SignerConfigError), result.output
    (tmp_path / "chain.pem").write_text("not a certificate")
    (tmp_path / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    monkeypatch.setenv("IMAGEGEN_C2PA_KEY", str(tmp_path / "key.pem"))
    get_settings.cache_clear()
    with pytest.raises(keys.SignerConfigError, match="holds no PEM certificate"):
        keys.load_signer()
    assert not (isolated_home / "provenance").exists()  # never a silent fallback to a development pair


def test_a_key_that_does_not_sign_for_its_certificate_is_refused_before_any_image(isolated_home, tmp_path, monkeypatch):
    """Signatures are not read back per image (c2pa's verify_after_sign is off for speed): the pair is
    proved once, so a mismatched key must fail there, in one line, never ship an invalid manifest."""
    first, second = tmp_path / "first", tmp_path / "second"
    keys.make_development_pair(first)
    keys.make_development_pair(second)
    monkeypatch.setenv("IMAGEGEN_C2PA_CERT", str(first / keys.CHAIN_FILE))
    monkeypatch.setenv("IMAGEGEN_C2PA_KEY", str(second / keys.KEY_FILE))
    get_settings.cache_clear()
    with pytest.raises(provenance.SignerCheckFailed, match="do not validate|refused by c2pa"):
        provenance.verify_signer(keys.load_signer())
    with pytest.raises(provenance.SignerCheckFailed):
        stamp_photo(samples.astronaut())
    # `imagegen serve` refuses it before Ray starts (a ConfigError: one line, exit 2)
    result = CliRunner().invoke(app, ["serve", "--port", "1"])
    assert isinstance(result.exception, provenance.SignerCheckFailed), result.output
