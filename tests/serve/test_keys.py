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
    secret = KEY_RE.match(plaintext).group(2)  # 43 url-safe characters, "_" among them: not split("_")[-1]
    assert plaintext.encode() not in raw and secret.encode() not in raw
    verifier = KeyVerifier(store, ttl_s=0)
    assert verifier.verify(plaintext).id == record.id
    assert verifier.verify(plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")) is None
    assert verifier.verify("") is None and verifier.verify("igk_nope") is None
    revoke_key(store, record.id)
    assert verifier.verify(plaintext) is None


def test_a_key_in_use_is_refreshed_ahead_and_a_revocation_still_applies_within_the_cache_time(store):
    now = [100.0]
    verifier = KeyVerifier(store, ttl_s=2.0, clock=lambda: now[0])
    record, plaintext = create_key(store, "busy-backend", ["render"])
    assert verifier.cached(plaintext) == (False, None)  # never read: its first request reads the database
    assert verifier.verify(plaintext).id == record.id
    now[0] += 0.5
    assert verifier.cached(plaintext)[1].id == record.id
    assert not verifier.claim_refresh(plaintext)  # young: nothing to do
    now[0] += 0.6  # past half its life
    assert verifier.claim_refresh(plaintext)
    assert not verifier.claim_refresh(plaintext)  # one refresh at a time
    revoke_key(store, record.id)
    assert verifier.cached(plaintext)[1].id == record.id  # requests go on with the cached answer meanwhile
    assert verifier.refresh(plaintext) is None
    assert verifier.cached(plaintext) == (True, None)  # refused from now on, before the old answer would expire
    assert not verifier.claim_refresh(plaintext)  # a refused key is never refreshed ahead
    now[0] += 2.0
    assert verifier.cached(plaintext) == (False, None)  # and every answer expires after ttl_s, refreshed or not


def test_the_ingress_refreshes_a_key_in_use_off_the_request_path_and_picks_up_its_revocation(isolated_home):
    """``Ingress.authenticate`` (the class itself, in one process): the request that finds its key half expired
    is answered from the cache and starts one background read; the next read sees the revocation."""
    import asyncio

    from imagegen.serve.errors import ApiError
    from imagegen.serve.ingress import in_one_process

    async def scenario() -> None:
        with in_one_process({}, []) as ingress:
            now = [0.0]
            ingress.verifier.ttl_s, ingress.verifier.clock = 2.0, lambda: now[0]
            record, plaintext = create_key(ingress.store, "busy-backend", ["render"])
            headers = {"authorization": f"Bearer {plaintext}"}
            assert (await ingress.authenticate(headers)).id == record.id  # read inline: nothing cached yet
            assert not ingress._key_refreshes
            now[0] = 1.2
            assert (await ingress.authenticate(headers)).id == record.id
            assert (await ingress.authenticate(headers)).id == record.id
            refreshes = list(ingress._key_refreshes)
            assert len(refreshes) == 1  # one background read for both requests
            await asyncio.gather(*refreshes)
            revoke_key(ingress.store, record.id)
            now[0] = 2.5  # the first answer has expired; the refreshed one (read at 1.2) is still fresh
            assert (await ingress.authenticate(headers)).id == record.id
            await asyncio.gather(*ingress._key_refreshes)  # claimed by that request: it reads the revocation
            with pytest.raises(ApiError) as refused:
                await ingress.authenticate(headers)
            assert refused.value.status == 401

    asyncio.run(scenario())


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
