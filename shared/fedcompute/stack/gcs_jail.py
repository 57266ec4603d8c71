"""Start fake-gcs-server shut inside its data directory.

fake-gcs-server's filesystem backend maps a bucket to ``root/<bucket>`` and an object to
``root/<bucket>/<object>`` after URL-escaping each; a bucket named ``..`` therefore maps
outside ``root``, and any process that can reach the emulator's port (every local process)
could write or read files with the stack's rights. Names cannot be checked in front of the
emulator (devices and tools talk to it directly), so the emulator itself is confined:

``python -m fedcompute.stack.gcs_jail ROOT BINARY ARGS...`` opens BINARY, changes its root
directory to ROOT (``chroot``), drops to an unprivileged user when started as root
(``nobody``, owner of ROOT), and executes the opened binary (a static Go executable, so it
needs nothing from the old root). Inside, every path, ``..`` included, resolves within ROOT.

Started as another user, it first enters a user namespace of its own (where it may
``chroot``); where the kernel refuses that, it says why on stderr (the component's log) and
runs the emulator unconfined.
"""
from __future__ import annotations

import ctypes
import os
import pwd
import sys
from pathlib import Path

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNS = 0x00020000
JAIL_USER = "nobody"


def jail_owner() -> tuple[int, int] | None:
    """The (uid, gid) the emulator runs as when the stack runs as root; None otherwise."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(JAIL_USER)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def hand_over(root: Path) -> None:
    """Give ``root`` and everything in it to the jail's user (once: later files are its own)."""
    owner = jail_owner()
    root.mkdir(parents=True, exist_ok=True)
    if owner is None or (root.stat().st_uid, root.stat().st_gid) == owner:
        return
    uid, gid = owner
    for directory, dirs, files in os.walk(root):
        os.chown(directory, uid, gid)
        for name in (*dirs, *files):
            os.chown(os.path.join(directory, name), uid, gid, follow_symlinks=False)


def _enter_user_namespace() -> str | None:
    """Become root of a fresh user (and mount) namespace; None, or why not."""
    uid, gid = os.getuid(), os.getgid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS) != 0:
        return f"unshare(CLONE_NEWUSER) failed: {os.strerror(ctypes.get_errno())}"
    try:
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
        Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    except OSError as error:
        return f"could not map the user namespace: {error}"
    return None


def confine(root: str) -> str:
    """chroot into ``root`` (and drop root); returns a one-line account for the log."""
    in_user_namespace = False
    if os.geteuid() != 0:
        refused = _enter_user_namespace()
        if refused:
            return f"fake-gcs-server runs UNCONFINED (names with '..' can reach outside {root}): {refused}"
        in_user_namespace = True
    owner = None if in_user_namespace else jail_owner()
    os.chroot(root)
    os.chdir("/")
    if owner is not None:
        os.setgroups([])
        os.setgid(owner[1])
        os.setuid(owner[0])
    where = " in a user namespace" if in_user_namespace else ""
    return f"fake-gcs-server confined to {root} (chroot, uid {os.getuid()}{where})"


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m fedcompute.stack.gcs_jail ROOT BINARY [ARGS...]", file=sys.stderr)
        return 2
    root, binary, *args = argv
    executable = os.open(binary, os.O_RDONLY)  # opened before the old root disappears
    print(confine(root), file=sys.stderr, flush=True)
    os.execve(executable, [binary, *args], dict(os.environ))
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
