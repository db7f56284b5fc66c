"""Helpers for the web tests: settings with a user and tokens, logging in, CSRF tokens."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher

from ddn_node.config import Settings

TOKEN = "test-token-1"
OTHER_TOKEN = "test-token-2"
USER, PASSWORD = "radiologist", "correct horse battery staple"
# make_client(database, model_dir=None, **web_settings) -> a TestClient of a new app
ClientFactory = Callable[..., Any]
# Cheap argon2 parameters: the tests check the logic, not the hashing cost.
FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)


def web_settings(tmp: Path, db_url: str, model_dir: Path | None = None, **web: Any) -> Settings:
    config: dict[str, Any] = {
        "node": {"spool_dir": str(tmp / "spool")},
        "database": {"url": db_url},
        "web": {
            "secret_key": "test-secret",
            "users": [{"name": USER, "password_hash": FAST_HASHER.hash(PASSWORD)}],
            # Both may change the worklist (the API tests do); tokens read only by default.
            "tokens": [
                {
                    "name": "ris",
                    "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                    "scopes": ["read", "worklist:write"],
                },
                {
                    "name": "other",
                    "sha256": hashlib.sha256(OTHER_TOKEN.encode()).hexdigest(),
                    "scopes": ["read", "worklist:write"],
                },
            ],
            **web,
        },
    }
    if model_dir is not None:
        config["routing"] = [{"name": "cxr", "model": str(model_dir), "head": "cxr"}]
    return Settings.model_validate(config)


def api_headers(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def login(client: Any, user: str = USER, password: str = PASSWORD) -> Any:
    form = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert token is not None, form.text
    return client.post(
        "/login",
        data={"username": user, "password": password, "csrf_token": token.group(1), "next": "/"},
    )


def csrf_of(html: str) -> str:
    found = re.search(r'<meta name="csrf-token" content="([^"]*)"', html)
    assert found is not None
    return found.group(1)
