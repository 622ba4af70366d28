"""The C2PA signer: the deployment's certificate chain and key, or a development pair.

C2PA validators refuse a self-signed leaf certificate and check the leaf's profile: X.509 v3,
``digitalSignature`` key usage, an extended key usage from the C2PA list (we use
``emailProtection`` and ``documentSigning``), ``basicConstraints CA:FALSE``, subject and
authority key identifiers. :func:`make_development_pair` therefore writes a development *CA*
and a leaf it issued, both named ``... DEVELOPMENT ...`` in their subjects so nobody mistakes
them for a real identity.

A deployment configures its own pair as secrets: ``IMAGEGEN_C2PA_CERT`` (PEM chain, leaf first)
and ``IMAGEGEN_C2PA_KEY`` (PEM private key). Without them the service signs with a development
pair made once under ``IMAGEGEN_HOME/provenance/dev-signer`` and says so (log at start, and
``development signer`` in every check report).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from imagegen.errors import ConfigError
from imagegen.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: what every development certificate's subject says
DEVELOPMENT_MARK = "DEVELOPMENT ONLY - NOT TRUSTED"
CA_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
CHAIN_FILE = "signer-chain.pem"
KEY_FILE = "signer.key"
#: files keygen writes, in this order
PAIR_FILES = (CA_FILE, CA_KEY_FILE, CHAIN_FILE, KEY_FILE)
#: id-kp-documentSigning (RFC 9336), on the C2PA list of allowed extended key usages
DOCUMENT_SIGNING_OID = "1.3.6.1.5.5.7.3.36"
ALGORITHM = "es256"


class SignerConfigError(ConfigError):
    code = "c2pa_signer_invalid"


@dataclass(frozen=True)
class SignerMaterial:
    """PEM text of a signing chain (leaf first) and its key, plus where it came from."""

    chain_pem: str
    key_pem: str
    #: "configured" (IMAGEGEN_C2PA_CERT/KEY) or "development"
    source: str
    chain_path: Path
    #: trust anchors a check may use for this signer (the development CA; None when configured)
    anchors_pem: str | None = None

    @property
    def development(self) -> bool:
        return self.source == "development"


def make_development_pair(out: Path, *, organisation: str = "imagegen", days: int = 825) -> dict[str, Path]:
    """Write a development CA and a signing leaf under ``out``; returns the written paths.

    Refuses to overwrite an existing pair (delete it first): a signer replaced by accident
    invalidates the trust configured for it.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out)
    existing = [name for name in PAIR_FILES if (out / name).exists()]
    if existing:
        raise SignerConfigError(f"{out} already holds {', '.join(existing)}; choose an empty directory", field="out")
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=days)

    def name(common: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, f"{common} ({DEVELOPMENT_MARK})"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "development"),
            ]
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("imagegen development CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(name("imagegen development signer"))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION, x509.ObjectIdentifier(DOCUMENT_SIGNING_OID)]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def pem_cert(cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    contents = {
        CA_FILE: pem_cert(ca),
        CA_KEY_FILE: pem_key(ca_key),
        CHAIN_FILE: pem_cert(leaf) + pem_cert(ca),
        KEY_FILE: pem_key(leaf_key),
    }
    written = {}
    for file, data in contents.items():
        path = out / file
        path.write_bytes(data)
        if file.endswith(".key"):
            path.chmod(0o600)
        written[file] = path
    return written


def development_dir(settings: Settings | None = None) -> Path:
    return (settings or get_settings()).home / "provenance" / "dev-signer"


def ensure_development_pair(settings: Settings | None = None) -> Path:
    """The development pair of this home, made once (several replicas may race: the first rename wins)."""
    target = development_dir(settings)
    if (target / CHAIN_FILE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".dev-signer-", dir=target.parent))
    try:
        make_development_pair(staging)
        try:
            os.rename(staging, target)
            log.warning(
                "C2PA: made a DEVELOPMENT signer under %s (no IMAGEGEN_C2PA_CERT/IMAGEGEN_C2PA_KEY configured); "
                "production deployments configure their own certificate and key",
                target,
            )
        except OSError:
            if not (target / CHAIN_FILE).exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _read(path: Path, what: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise SignerConfigError(f"cannot read {what} {path}: {exc.strerror or exc}", field=what) from exc


def load_signer(settings: Settings | None = None) -> SignerMaterial:
    """The configured signer, or this home's development pair when none is configured.

    One of ``IMAGEGEN_C2PA_CERT`` / ``IMAGEGEN_C2PA_KEY`` without the other, an unreadable
    file or a file that is not PEM is a configuration error, never a silent fallback.
    """
    settings = settings or get_settings()
    cert, key = settings.c2pa_cert, settings.c2pa_key
    if (cert is None) != (key is None):
        missing = "IMAGEGEN_C2PA_KEY" if key is None else "IMAGEGEN_C2PA_CERT"
        raise SignerConfigError(f"C2PA signing needs both IMAGEGEN_C2PA_CERT and IMAGEGEN_C2PA_KEY; {missing} is unset")
    if cert is not None and key is not None:
        chain, private = _read(cert, "IMAGEGEN_C2PA_CERT"), _read(key, "IMAGEGEN_C2PA_KEY")
        if "BEGIN CERTIFICATE" not in chain:
            raise SignerConfigError(f"IMAGEGEN_C2PA_CERT {cert} holds no PEM certificate")
        if "PRIVATE KEY" not in private:
            raise SignerConfigError(f"IMAGEGEN_C2PA_KEY {key} holds no PEM private key")
        return SignerMaterial(chain, private, "configured", Path(cert))
    folder = ensure_development_pair(settings)
    return SignerMaterial(
        _read(folder / CHAIN_FILE, "development chain"),
        _read(folder / KEY_FILE, "development key"),
        "development",
        folder / CHAIN_FILE,
        anchors_pem=_read(folder / CA_FILE, "development CA"),
    )


@lru_cache(maxsize=4)
def _cached(home: Path, cert: Path | None, key: Path | None) -> SignerMaterial:
    return load_signer(get_settings())


def signer_material() -> SignerMaterial:
    """``load_signer`` of this process's settings, read once (the stamping hot path)."""
    settings = get_settings()
    return _cached(settings.home, settings.c2pa_cert, settings.c2pa_key)


def trust_anchors(settings: Settings | None = None) -> list[tuple[str, str]]:
    """(label, PEM) of the CAs a check trusts: ``IMAGEGEN_C2PA_TRUST`` and this home's development CA."""
    settings = settings or get_settings()
    anchors = []
    if settings.c2pa_trust is not None:
        anchors.append(("configured trust anchors", _read(settings.c2pa_trust, "IMAGEGEN_C2PA_TRUST")))
    dev = development_dir(settings) / CA_FILE
    if dev.exists():
        anchors.append(("development CA of this IMAGEGEN_HOME", dev.read_text()))
    return anchors
