#!/usr/bin/env bash
# Builds the Debian package of blkrepl: TARGET/debian/blkrepl_VERSION_ARCH.deb (TARGET is
# $CARGO_TARGET_DIR, default target), from a release build, with dpkg-deb alone: cargo-deb would
# need a long `cargo install` on every fresh machine for what this script does in a page.
#
#   scripts/package-deb.sh          prints the path of the package it built
#
# Contents: /usr/sbin/blkrepl (stripped), the OCF agent as ocf:blkrepl:blkrepl
# (/usr/lib/ocf/resource.d/blkrepl/blkrepl), the systemd units blkrepl@.service and
# blkrepl-promoter.service, bash, zsh and fish completions and the manual page blkrepl(8) (both
# made by the binary from its CLI definition), README, OPERATIONS and copyright in
# /usr/share/doc/blkrepl, and /etc/blkrepl (empty: the
# resource files are the administrator's, so there are no conffiles). Depends is what
# dpkg-shlibdeps finds the binary linked against; the agent's needs (jq, resource-agents'
# ocf-shellfuncs) are Recommends, since a node run by systemd alone has no use for them.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh package >&2
umask 022

cargo build --release --bin blkrepl >&2
target=${CARGO_TARGET_DIR:-target}
binary=$target/release/blkrepl
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
built=$("$binary" -V)
if [ "$built" != "blkrepl $version" ]; then
  echo "package-deb: $binary says '$built', Cargo.toml says $version" >&2
  exit 1
fi

# dpkg-shlibdeps reads debian/control and expects the files in debian/PACKAGE: the same layout
# as a Debian source package's build tree.
work=$target/debian/build
pkg=$work/debian/blkrepl
rm -rf "$work"
mkdir -p "$pkg/DEBIAN"

install -D -m 0755 "$binary" "$pkg/usr/sbin/blkrepl"
strip --strip-unneeded "$pkg/usr/sbin/blkrepl"
install -D -m 0755 scripts/ocf/blkrepl "$pkg/usr/lib/ocf/resource.d/blkrepl/blkrepl"
install -D -m 0644 scripts/systemd/blkrepl@.service "$pkg/usr/lib/systemd/system/blkrepl@.service"
install -D -m 0644 scripts/systemd/blkrepl-promoter.service "$pkg/usr/lib/systemd/system/blkrepl-promoter.service"
install -d -m 0755 "$pkg/usr/share/bash-completion/completions" "$pkg/usr/share/zsh/vendor-completions" \
  "$pkg/usr/share/fish/vendor_completions.d" "$pkg/usr/share/man/man8" "$pkg/usr/share/doc/blkrepl" "$pkg/etc/blkrepl"
"$binary" completions bash >"$pkg/usr/share/bash-completion/completions/blkrepl"
"$binary" completions zsh >"$pkg/usr/share/zsh/vendor-completions/_blkrepl"
"$binary" completions fish >"$pkg/usr/share/fish/vendor_completions.d/blkrepl.fish"
"$binary" man | gzip -9n >"$pkg/usr/share/man/man8/blkrepl.8.gz"
install -m 0644 README.md docs/OPERATIONS.md "$pkg/usr/share/doc/blkrepl/"
cat >"$pkg/usr/share/doc/blkrepl/copyright" <<'EOF'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: blkrepl

Files: *
Copyright: the blkrepl authors
License: MIT or Apache-2.0

License: Apache-2.0
 On Debian systems the full text of the Apache License, Version 2.0 is in
 /usr/share/common-licenses/Apache-2.0.

License: MIT
 Permission is hereby granted, free of charge, to any person obtaining a copy
 of this software and associated documentation files (the "Software"), to deal
 in the Software without restriction, including without limitation the rights
 to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
 copies of the Software, and to permit persons to whom the Software is
 furnished to do so, subject to the following conditions:
 .
 The above copyright notice and this permission notice shall be included in
 all copies or substantial portions of the Software.
 .
 THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
 IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
 FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
 AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
 LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
 OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN
 THE SOFTWARE.
EOF

printf 'Source: blkrepl\n\nPackage: blkrepl\nArchitecture: any\n' >"$work/debian/control"
depends=$(cd "$work" && dpkg-shlibdeps -O debian/blkrepl/usr/sbin/blkrepl | sed -n 's/^shlibs:Depends=//p')
if [ -z "$depends" ]; then
  echo "package-deb: dpkg-shlibdeps found no libraries for $binary" >&2
  exit 1
fi
maintainer="${DEBFULLNAME:-$(git log -1 --format=%an)} <${DEBEMAIL:-$(git log -1 --format=%ae)}>"
description=$(sed -n 's/^description = "\(.*\)"$/\1/p' Cargo.toml | head -1)
cat >"$pkg/DEBIAN/control" <<EOF
Package: blkrepl
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
Depends: $depends
Recommends: jq, resource-agents
Suggests: pacemaker
Section: admin
Priority: optional
Description: $description
 A userspace daemon in the spirit of DRBD: the primary node exports a block
 device (/dev/ublkbN or an NBD export) and mirrors every write to its peers
 over TCP, with on-disk metadata so that a reconnect or a crash resyncs only
 the blocks that differ. Includes the systemd units blkrepl@.service and
 blkrepl-promoter.service (promotion and services without a cluster manager)
 and the Pacemaker resource agent ocf:blkrepl:blkrepl (which needs jq).
EOF
(cd "$pkg" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) >"$pkg/DEBIAN/md5sums"

deb=$target/debian/blkrepl_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$deb" >&2
if command -v lintian >/dev/null; then
  lintian --no-tag-display-limit "$deb" >&2 || echo "package-deb: lintian has remarks (above)" >&2
fi
echo "$deb"
