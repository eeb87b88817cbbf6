"""Two "nodes" on one machine for the multi-node tests: an sshd of the test's own on 127.0.0.1 and 127.0.0.2
(throw-away keys and config in a temporary folder, a free port), and a watcher that finds a job's training
processes through /proc to check what each launcher gave them (rank, local rank, node, cwd, interpreter).

DeepSpeed's multi-node runner is `pdsh -R ssh`, and pdsh runs the `ssh` it finds on PATH; so does
DeepSpeed's own passwordless-ssh check. `Loopback.env` puts a one-line `ssh` first on PATH that adds
`-F <our ssh_config>` (port, key, no host-key prompts): what a user's ~/.ssh/config does on a cluster,
without touching this machine's ~/.ssh.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine_helpers import REPO, free_port

HOSTS = ("127.0.0.1", "127.0.0.2")


@dataclass
class Loopback:
    """A running sshd reachable on both loopback addresses, and the environment that reaches it."""

    folder: Path
    port: int
    sshd: subprocess.Popen
    ssh_bin: Path = field(init=False)

    def __post_init__(self) -> None:
        self.ssh_bin = self.folder / "bin"

    def env(self, base: dict[str, str]) -> dict[str, str]:
        return {**base, "PATH": f"{self.ssh_bin}{os.pathsep}{base.get('PATH', os.defpath)}"}

    def stop(self) -> None:
        self.sshd.terminate()
        try:
            self.sshd.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.sshd.kill()


def ensure_tools() -> None:
    """pdsh, ssh, ssh-keygen and sshd, installed by the project's own set-up script when missing."""
    if all(shutil.which(t) for t in ("pdsh", "ssh", "ssh-keygen")) and _sshd():
        return
    r = subprocess.run(["bash", str(REPO / "launch" / "setup_multinode.sh")], capture_output=True, text=True)
    if r.returncode != 0 or not _sshd():
        raise RuntimeError(
            f"launch/setup_multinode.sh could not install pdsh/ssh/sshd:\n{r.stdout}\n{r.stderr}"
        )


def _sshd() -> str | None:
    return shutil.which("sshd") or ("/usr/sbin/sshd" if os.access("/usr/sbin/sshd", os.X_OK) else None)


def start(folder: Path) -> Loopback:
    """Keys, configs, `sshd -D` on a free port of both loopback addresses, and a PATH `ssh` that uses them."""
    ensure_tools()
    folder.mkdir(parents=True, exist_ok=True)
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / key)], check=True)
    auth = folder / "authorized_keys"
    auth.write_text((folder / "client_key.pub").read_text())
    auth.chmod(0o600)
    port = free_port()
    sshd_config = folder / "sshd_config"
    sshd_config.write_text(
        "".join(f"ListenAddress {h}\n" for h in HOSTS)
        + f"Port {port}\nHostKey {folder / 'host_key'}\nAuthorizedKeysFile {auth}\nPidFile {folder / 'sshd.pid'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
    )
    ssh_config = folder / "ssh_config"
    ssh_config.write_text(
        f"Host {' '.join(HOSTS)}\n  Port {port}\n  IdentityFile {folder / 'client_key'}\n  IdentitiesOnly yes\n"
        "  UserKnownHostsFile /dev/null\n  StrictHostKeyChecking no\n  BatchMode yes\n  LogLevel ERROR\n"
    )
    (folder / "bin").mkdir(exist_ok=True)
    wrapper = folder / "bin" / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {ssh_config} "$@"\n')
    wrapper.chmod(0o755)
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    log = (folder / "sshd.log").open("w")
    proc = subprocess.Popen([_sshd(), "-D", "-e", "-f", str(sshd_config)], stdout=log, stderr=log)
    node = Loopback(folder, port, proc)
    _wait_listening(node)
    return node


def _wait_listening(node: Loopback, timeout: float = 15.0) -> None:
    deadline = time.time() + timeout
    pending = list(HOSTS)
    while pending and time.time() < deadline:
        if node.sshd.poll() is not None:
            raise RuntimeError(f"sshd exited: {(node.folder / 'sshd.log').read_text()}")
        try:
            with socket.create_connection((pending[0], node.port), timeout=1):
                pending.pop(0)
        except OSError:
            time.sleep(0.1)
    if pending:
        node.stop()
        raise RuntimeError(
            f"sshd not listening on {pending} port {node.port}: {(node.folder / 'sshd.log').read_text()}"
        )


# ------------------------------------------------------------------------------------------- watching


@dataclass(frozen=True)
class Proc:
    """A training process as the launcher left it."""

    pid: int
    ppid: int
    rank: int
    local_rank: int
    world_size: int
    node: str  # the loopback address ssh reached (SSH_CONNECTION), or the test's TUBELET_TEST_NODE
    cwd: str
    exe: str
    master_addr: str


def _read_proc(pid: int, mark: str) -> Proc | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        cwd = os.readlink(f"/proc/{pid}/cwd")
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
    env = dict(x.split("=", 1) for x in raw.decode(errors="replace").split("\0") if "=" in x)
    if env.get("TUBELET_TEST_MARK") != mark or "RANK" not in env or "LOCAL_RANK" not in env:
        return None
    if not any(b"pretrain" in a for a in cmdline[1:]):  # a helper it started (a compiler probe, ...)
        return None
    node = env.get("SSH_CONNECTION", "").split()[2:3] or [env.get("TUBELET_TEST_NODE", "?")]
    return Proc(
        pid,
        ppid,
        int(env["RANK"]),
        int(env["LOCAL_RANK"]),
        int(env.get("WORLD_SIZE", "0")),
        node[0],
        cwd,
        cmdline[0].decode(),
        env.get("MASTER_ADDR", ""),
    )


class Watcher:
    """Polls /proc for processes carrying `TUBELET_TEST_MARK=mark` and a RANK (the training processes, not
    the launchers), remembering each one it has seen."""

    def __init__(self, mark: str) -> None:
        self.mark, self.seen, self._stop = mark, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for entry in os.listdir("/proc"):
                if entry.isdigit() and int(entry) not in self.seen:
                    p = _read_proc(int(entry), self.mark)
                    if p is not None:
                        self.seen[p.pid] = p
            time.sleep(0.1)

    def rank(self, rank: int, timeout: float = 120.0) -> Proc:
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = [p for p in self.seen.values() if p.rank == rank]
            if found:
                return found[-1]
            time.sleep(0.05)
        raise TimeoutError(f"no training process with RANK={rank} appeared")

    def stop(self) -> list[Proc]:
        """The training processes seen, by rank: those whose parent is not one of them (not a fork)."""
        self._stop.set()
        self._thread.join()
        top = [p for p in self.seen.values() if p.ppid not in self.seen]
        return sorted(top, key=lambda p: p.rank)

    def kill_leftovers(self) -> None:
        """After a failed test: end the job's training processes that are still there (by pid)."""
        for p in self.seen.values():
            if _read_proc(p.pid, self.mark) is not None:
                os.kill(p.pid, 9)
