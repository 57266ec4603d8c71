"""Small helpers shared by the integration and e2e tests."""
from __future__ import annotations

import uuid

import requests


def unique(prefix: str, sep: str = "-", length: int = 10) -> str:
    """A name no other test uses (populations, topics): ``prefix`` + random hex."""
    return f"{prefix}{sep}{uuid.uuid4().hex[:length]}"


def http() -> requests.Session:
    """A session that ignores proxy settings: every request stays on loopback."""
    session = requests.Session()
    session.trust_env = False
    return session
