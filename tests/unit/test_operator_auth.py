"""Operator APIs need a key whenever they are reachable beyond loopback (issue 13, Low:
local operator APIs open to any process; High 1: the local builder had no authentication)."""
from __future__ import annotations

from pathlib import Path

import pytest

from fedcompute.errors import StackError
from fedcompute.stack.local import API_KEY_ENV, LocalStack, is_loopback_host


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20"])
def test_the_stack_refuses_to_bind_beyond_loopback_without_a_key(tmp_path: Path, host: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with pytest.raises(StackError, match=f"refusing to serve the functions on {host}, beyond loopback"):
        LocalStack(tmp_path, function_host=host)
    assert list(tmp_path.iterdir()) == []  # refused before anything started


def test_with_a_key_the_stack_binds_where_asked_and_hands_the_key_to_the_functions(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    stack = LocalStack(tmp_path, function_host="0.0.0.0", api_key="k" * 32)
    env = stack._process_env({}, "stack-id")
    assert env[API_KEY_ENV] == "k" * 32
    keyless = LocalStack(tmp_path, api_key="")
    monkeypatch.setenv(API_KEY_ENV, "from-the-shell")
    assert API_KEY_ENV not in keyless._process_env({}, "stack-id")  # explicitly keyless stays keyless
    assert LocalStack(tmp_path).api_key == "from-the-shell"  # the shell's key is honoured by default


def test_loopback_hosts() -> None:
    assert all(is_loopback_host(h) for h in ("127.0.0.1", "::1", "localhost", "127.0.0.2"))
    assert not any(is_loopback_host(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.com"))
