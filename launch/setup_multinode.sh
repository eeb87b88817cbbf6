#!/usr/bin/env bash
# What DeepSpeed's multi-node launcher needs on a node: pdsh (its default runner) and ssh (client and
# server). Idempotent: when pdsh, ssh and sshd are all present it only says so. Debian/Ubuntu (apt-get), as
# root or with passwordless sudo; elsewhere it names the packages to install.
#
#   bash launch/setup_multinode.sh
#
# The multi-node tests (tests/engine/test_multinode.py, `bash tests/run.sh -m slow`) call it when sshd or
# pdsh is missing, then start their own sshd on 127.0.0.1/127.0.0.2 with throw-away keys; nothing here
# starts a server or touches ~/.ssh. On a machine with systemd, installing openssh-server also starts the
# system's sshd on port 22 (Debian's default); the tests do not use it.
set -euo pipefail

need=()
command -v pdsh >/dev/null 2>&1 || need+=(pdsh)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
[ -x /usr/sbin/sshd ] || command -v sshd >/dev/null 2>&1 || need+=(openssh-server)
if [ ${#need[@]} -eq 0 ]; then
    echo "setup_multinode: pdsh, ssh and sshd are installed"
    exit 0
fi
mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)

if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
else
    echo "setup_multinode: installing ${need[*]} needs root or passwordless sudo;" \
        "run: sudo apt-get install -y ${need[*]}" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_multinode: no apt-get here; install ${need[*]} with this system's package manager" >&2
    exit 1
fi
echo "setup_multinode: installing ${need[*]}"
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
