"""API keys: hashed storage, verification, revocation, scopes, tenants and the `imagegen keys` commands."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from imagegen.cli import app
from imagegen.errors import ImagegenError
from imagegen.serve.auth import KEY_RE, KeyVerifier, allows, create_key, hash_secret, revoke_key
from imagegen.serve.store import ServeStore


@pytest.fixture
def store(isolated_home):
    with ServeStore.open() as store:
        yield store


def test_keys_are_stored_hashed_and_verified(store, isolated_home):
    record, plaintext = create_key(store, "backend-a", ["render", "characters:write"])
    assert KEY_RE.match(plaintext)
    assert record.scopes == ["characters:write", "render"]
    stored = store.get_key(record.id)
    assert stored.secret_sha256 == hash_secret(plaintext) and plaintext not in stored.secret_sha256
    raw = (isolated_home / "registry.db").read_bytes()
    assert plaintext.encode() not in raw and plaintext.split("_")[-1].encode() not in raw
    verifier = KeyVerifier(store, ttl_s=0)
    assert verifier.verify(plaintext).id == record.id
    assert verifier.verify(plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")) is None
    assert verifier.verify("") is None and verifier.verify("igk_nope") is None
    revoke_key(store, record.id)
    assert verifier.verify(plaintext) is None


def test_scopes_and_refusals(store):
    assert allows(["admin"], "render") and allows(["render"], None)
    assert not allows(["render"], "characters:write")
    # registering a face does not clear it for rendering: approval is its own scope
    assert not allows(["characters:write"], "characters:approve")
    assert allows(["characters:approve"], "characters:approve") and allows(["admin"], "characters:approve")
    assert create_key(store, "approver", ["characters:approve"])[0].scopes == ["characters:approve"]
    with pytest.raises(ImagegenError, match="unknown scope"):
        create_key(store, "x", ["root"])
    with pytest.raises(ImagegenError, match="at least one scope"):
        create_key(store, "x", [])
    with pytest.raises(ImagegenError, match="name"):
        create_key(store, "  ", ["render"])
    with pytest.raises(ImagegenError, match="no API key"):
        revoke_key(store, "000000000000")


def test_keys_cli(isolated_home):
    runner = CliRunner()
    created = runner.invoke(app, ["keys", "create", "--name", "ci-bot", "--scope", "render", "--scope", "admin"])
    assert created.exit_code == 0, created.output
    plaintext = re.search(r"igk_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", created.output).group(0)
    key_id = plaintext.split("_")[1]
    listed = runner.invoke(app, ["keys", "list", "--json"])
    keys = json.loads(listed.output)
    assert [k["id"] for k in keys] == [key_id] and keys[0]["scopes"] == ["admin", "render"]
    assert keys[0]["tenant"] == "default"
    assert plaintext not in listed.output
    assert runner.invoke(app, ["keys", "list"]).exit_code == 0
    revoked = runner.invoke(app, ["keys", "revoke", key_id])
    assert revoked.exit_code == 0 and "revoked" in revoked.output
    assert json.loads(runner.invoke(app, ["keys", "list", "--json"]).output)[0]["revoked_at"]


def test_keys_belong_to_a_tenant(isolated_home):
    runner = CliRunner()
    created = runner.invoke(app, ["keys", "create", "--name", "acme-bot", "--tenant", "acme", "-s", "characters:write"])
    assert created.exit_code == 0, created.output
    assert "tenant acme" in created.output
    listed = json.loads(runner.invoke(app, ["keys", "list", "--json"]).output)
    assert [(k["tenant"], k["scopes"]) for k in listed] == [("acme", ["characters:write"])]
    assert "acme" in runner.invoke(app, ["keys", "list"]).output
    with ServeStore.open() as store:
        record = store.get_key(listed[0]["id"])
        assert record.tenant == "acme"
        verified = KeyVerifier(store, ttl_s=0).verify(re.search(r"igk_\S+", created.output).group(0))
        assert verified.tenant == "acme"


def test_a_bad_tenant_is_refused_in_one_line_and_creates_nothing(isolated_home):
    proc = subprocess.run(
        [sys.executable, "-m", "imagegen.cli", "keys", "create", "--name", "x", "--tenant", "Acme Corp"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error (tenant): 'Acme Corp' is not a valid tenant id: use 1 to 64 characters, lowercase letters a-z, "
        "digits, '-' and '_', starting with a letter or a digit (for example 'acme')"
    ]
    assert not (isolated_home / "registry.db").exists()
