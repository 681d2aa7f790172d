#!/usr/bin/env bash
# Builds a `docker save` tarball of a one-layer busybox image from this machine's /bin/busybox
# (Debian's busybox-static) and its applet symlinks, with `Cmd ["sh"]` — no Docker, no registry:
# only coreutils, tar, sha256sum and printf. Import it with `gantry-agent image import OUT.tar`.
#
# usage: deploy/build-busybox-image.sh OUT.tar [TAG]     (TAG default gantry.local/busybox:1)
# BUSYBOX=/path/to/busybox overrides the binary. The output is reproducible (fixed owners and
# mtimes, sorted entries): the same busybox gives the same digests.
set -euo pipefail

out=${1:?usage: $0 OUT.tar [TAG]}
tag=${2:-gantry.local/busybox:1}
busybox=${BUSYBOX:-/bin/busybox}
[ -x "$busybox" ] || { echo "$0: $busybox not found; install busybox-static" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tarflags=(--sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 --format=gnu)

# The layer: the root filesystem.
root=$work/rootfs
mkdir -p "$root"/{bin,etc,proc,dev,sys,tmp,root,www}
chmod 1777 "$root/tmp"
chmod 700 "$root/root"
cp "$busybox" "$root/bin/busybox"
chmod 755 "$root/bin/busybox"
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
tar -C "$root" "${tarflags[@]}" -cf "$work/layer.tar" bin etc proc dev sys tmp root www
layer=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)

# The config, named by its digest, and the manifest naming both.
arch=$(uname -m)
case $arch in x86_64) arch=amd64 ;; aarch64) arch=arm64 ;; esac
printf '{"architecture":"%s","os":"linux","config":{"Cmd":["sh"],"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
  "$arch" "$layer" >"$work/config.json"
config=$(sha256sum "$work/config.json" | cut -d' ' -f1)

image=$work/image
mkdir -p "$image/$layer"
mv "$work/layer.tar" "$image/$layer/layer.tar"
mv "$work/config.json" "$image/$config.json"
printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["%s/layer.tar"]}]' \
  "$config" "$tag" "$layer" >"$image/manifest.json"
tar -C "$image" "${tarflags[@]}" -cf "$work/out.tar" manifest.json "$config.json" "$layer"
mv "$work/out.tar" "$out"
echo "$out: $tag (config sha256:$config, layer sha256:$layer)"
