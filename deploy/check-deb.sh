#!/usr/bin/env bash
# Builds the Debian package, installs it with dpkg, checks what it installed (binary,
# units, conffiles, the lienthong user, /var/lib/lienthong 0750, nothing started), runs
# the installed binary (--version, `pki dev` into a temporary folder, --check-config),
# then purges it and checks that the state directory went with it.
# Needs root (or sudo) and dpkg; prints SKIPPED without them. Run by .ci/run after the
# tests.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then
    if sudo -n true 2>/dev/null; then SUDO="sudo"; else
        echo "check-deb: SKIPPED (needs root or password-less sudo for dpkg -i)"
        exit 0
    fi
fi
if ! command -v dpkg >/dev/null; then
    echo "check-deb: SKIPPED (no dpkg)"
    exit 0
fi
if dpkg-query -W -f='${Status}' lienthong 2>/dev/null | grep -q "installed"; then
    echo "check-deb: a lienthong package is already installed here; refusing to replace it" >&2
    exit 1
fi

fail() {
    echo "check-deb: FAILED: $*" >&2
    exit 1
}

deb=$(bash deploy/build-deb.sh | tail -1)
echo "check-deb: built $deb ($(du -h "$deb" | cut -f1))"
dpkg-deb --info "$deb" | sed -n '1,/Description/p'
work=$(mktemp -d)
purge() { $SUDO dpkg --purge lienthong >/dev/null 2>&1 || true; rm -rf "$work"; }
trap purge EXIT

$SUDO dpkg -i "$deb"

# What the package installed.
[ -x /usr/bin/lienthong ] || fail "/usr/bin/lienthong is not installed"
for unit in lienthong-broker.service lienthong-agent.service; do
    [ -f "/lib/systemd/system/$unit" ] || fail "$unit is not installed"
    grep -q '^ExecStart=/usr/bin/lienthong ' "/lib/systemd/system/$unit" ||
        fail "$unit does not start /usr/bin/lienthong"
done
conffiles=$(dpkg-query -W -f='${Conffiles}' lienthong)
for file in /etc/lienthong/broker.toml /etc/lienthong/agent.toml; do
    [ -f "$file" ] || fail "$file is not installed"
    grep -q "$file" <<<"$conffiles" || fail "$file is not a conffile"
done
getent passwd lienthong >/dev/null || fail "no lienthong user"
[ "$(stat -c '%U:%G %a' /var/lib/lienthong)" = "lienthong:lienthong 750" ] ||
    fail "/var/lib/lienthong is $(stat -c '%U:%G %a' /var/lib/lienthong), not lienthong:lienthong 750"
[ "$(stat -c '%U:%G %a' /etc/lienthong)" = "root:lienthong 750" ] ||
    fail "/etc/lienthong is $(stat -c '%U:%G %a' /etc/lienthong), not root:lienthong 750"
if command -v pgrep >/dev/null && pgrep -u lienthong >/dev/null 2>&1; then
    fail "the package started a process as lienthong"
fi

# The installed binary works from its installed path.
/usr/bin/lienthong --version
/usr/bin/lienthong pki dev --out "$work/pki" >/dev/null
[ -s "$work/pki/ca.crt" ] || fail "pki dev wrote no CA certificate"
[ "$(stat -c '%a' "$work/pki/broker.key")" = 600 ] || fail "pki dev's broker key is not 0600"
# The shipped broker config names /etc/lienthong/pki, not installed yet: a check
# names those files and exits 2; pointed at the dev PKI it passes.
set +e
/usr/bin/lienthong broker --check-config --config /etc/lienthong/broker.toml 2>"$work/check.err"
status=$?
set -e
[ "$status" = 2 ] || fail "check-config of the shipped broker.toml exited $status, not 2"
grep -q /etc/lienthong/pki/ca.crt "$work/check.err" || fail "check-config did not name the CA file"
sed -e "s|/etc/lienthong/pki/|$work/pki/|" \
    -e "s|/var/lib/lienthong/broker|$work/data|" /etc/lienthong/broker.toml >"$work/broker.toml"
/usr/bin/lienthong broker --check-config --config "$work/broker.toml"

$SUDO dpkg --purge lienthong
trap 'rm -rf "$work"' EXIT
[ ! -e /usr/bin/lienthong ] || fail "/usr/bin/lienthong is still there after purge"
[ ! -e /var/lib/lienthong ] || fail "/var/lib/lienthong is still there after purge"
[ ! -e /etc/lienthong/broker.toml ] || fail "/etc/lienthong/broker.toml is still there after purge"
echo "check-deb: OK (installed, ran, purged)"
