"""API keys: hashed storage, verification, revocation, scopes and the `imagegen keys` commands."""

from __future__ import annotations

import json
import re

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
    assert plaintext not in listed.output
    assert runner.invoke(app, ["keys", "list"]).exit_code == 0
    revoked = runner.invoke(app, ["keys", "revoke", key_id])
    assert revoked.exit_code == 0 and "revoked" in revoked.output
    assert json.loads(runner.invoke(app, ["keys", "list", "--json"]).output)[0]["revoked_at"]
