# shellcheck shell=bash
# Host-side preparation for test/vm/run: tools, a Debian kernel and a tiny initramfs.
# Sourced by test/vm/run; expects VM_CACHE (the repo's .vm/ directory) and VM_DIR (test/vm).
# Everything is cached under $VM_CACHE (kernel-<hash>/, initrd-<hash>.cpio): a second run
# touches no registry.

# Modules the guest needs; their dependencies are resolved from each .ko's "depends=" field.
# crc32c_generic goes first: ext4/jbd2/libcrc32c only name it as a soft dependency.
# virtio_blk: the persistent disk of the power-cut tests (test/vm/powercut).
VM_WANTED_MODULES="crc32c_generic virtio_pci virtio-rng virtio_blk 9pnet_virtio 9p overlay loop dm-thin-pool ext4"

vm_log() { printf 'vm: %s\n' "$*" >&2; }
vm_die() { printf 'vm: error: %s\n' "$*" >&2; exit 125; }

vm_apt_updated=0
vm_apt_update_once() {
  if [ "$vm_apt_updated" = 0 ]; then
    vm_log "apt-get update"
    apt-get update -qq >&2 || vm_die "apt-get update failed"
    vm_apt_updated=1
  fi
}

vm_have_static_busybox() {
  [ -x /bin/busybox ] && dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed'
}

vm_have_package() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'ok installed'
}

vm_ensure_host_tools() {
  local missing=()
  command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
  vm_have_static_busybox || missing+=(busybox-static)
  command -v cpio >/dev/null || missing+=(cpio)
  # The guest runs the host's userland: the helper's device-mapper and ext4 tools come from here.
  [ -x /usr/sbin/dmsetup ] || missing+=(dmsetup)
  [ -x /usr/sbin/mkfs.ext4 ] || missing+=(e2fsprogs)
  # thin_ls: the helper's thin.list reads the pool's metadata with it.
  [ -x /usr/sbin/thin_ls ] || missing+=(thin-provisioning-tools)
  # udevd, run in the guest as a host runs it (guest-session.sh start_udev); never started here.
  [ -x /lib/systemd/systemd-udevd ] || missing+=(udev)
  # The Python SDK's generator and its e2e test (client/python, test/e2e/python-sdk.test.ts):
  # Debian's protoc with the well-known types' .proto files, grpc_python_plugin, and the
  # python3 modules of the same protobuf and gRPC releases.
  local pkg
  for pkg in protobuf-compiler libprotobuf-dev protobuf-compiler-grpc python3-protobuf python3-grpcio; do
    vm_have_package "$pkg" || missing+=("$pkg")
  done
  [ ${#missing[@]} = 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    vm_die "missing host packages: ${missing[*]} (run as root to install them automatically)"
  fi
  vm_apt_update_once
  vm_log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 \
    || vm_die "apt-get install ${missing[*]} failed"
}

# Name of the versioned kernel package behind linux-image-amd64 (plain flavour: it has 9p).
vm_kernel_package() {
  local pkg
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-.*-amd64$/ && $2 !~ /cloud/ { print $2; exit }')
  if [ -z "$pkg" ]; then
    vm_apt_update_once
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-.*-amd64$/ && $2 !~ /cloud/ { print $2; exit }')
  fi
  [ -n "$pkg" ] || vm_die "cannot find the kernel package that linux-image-amd64 depends on"
  printf '%s\n' "$pkg"
}

# Print the module names (underscored) in load order: dependencies before dependents.
vm_module_order() {
  local moddir=$1
  declare -A path_of=() seen=()
  local f name
  while IFS= read -r f; do
    name=$(basename "$f"); name=${name%%.ko*}; name=${name//-/_}
    path_of[$name]=$f
  done < <(find "$moddir" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst')

  visit() {
    local m=${1//-/_} deps dep
    [ -n "${seen[$m]:-}" ] && return 0
    seen[$m]=1
    [ -n "${path_of[$m]:-}" ] || vm_die "kernel module $m not found in the kernel package"
    deps=$(vm_module_field "${path_of[$m]}" depends)
    for dep in ${deps//,/ }; do visit "$dep"; done
    printf '%s %s\n' "$m" "${path_of[$m]}"
  }
  local want
  for want in $VM_WANTED_MODULES; do visit "$want"; done
}

vm_module_field() {
  local file=$1 field=$2
  case "$file" in
    *.xz) xz -dc "$file" ;;
    *.zst) zstd -qdc "$file" ;;
    *) cat "$file" ;;
  esac | vm_strings | sed -n "s/^$field=//p" | head -n1
}

# binutils' strings when present, else busybox's (always installed by now).
vm_strings() {
  if command -v strings >/dev/null; then strings; else /bin/busybox strings; fi
}

vm_copy_module() {
  local src=$1 dst=$2
  case "$src" in
    *.xz) xz -dc "$src" >"$dst" ;;
    *.zst) zstd -qdc "$src" >"$dst" ;;
    *) cp "$src" "$dst" ;;
  esac
}

vm_download_kernel_package() { # PKG DIR: the .deb into DIR
  local pkg=$1 dir=$2
  if ! (cd "$dir" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2); then
    vm_apt_update_once
    (cd "$dir" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2) || vm_die "apt-get download $pkg failed"
  fi
}

# Once: $VM_CACHE/kernel-<hash>/ with vmlinuz, the wanted modules (numbered in load order) and
# modules/order. Prints that directory.
vm_ensure_kernel() {
  local key dir tmp pkg order i=0 name path
  key=$(printf '%s\n' "$VM_WANTED_MODULES" | sha256sum | cut -c1-12)
  dir=$VM_CACHE/kernel-$key
  if [ -s "$dir/vmlinuz" ] && [ -s "$dir/modules/order" ]; then
    printf '%s\n' "$dir"; return 0
  fi
  mkdir -p "$VM_CACHE"
  tmp=$(mktemp -d "$VM_CACHE/.kernel-build.XXXXXX")
  pkg=$(vm_kernel_package)
  vm_log "downloading $pkg"
  vm_download_kernel_package "$pkg" "$tmp"
  dpkg -x "$tmp"/*.deb "$tmp/pkg" || vm_die "cannot unpack $pkg"
  rm -f "$tmp"/*.deb
  [ -d "$(echo "$tmp"/pkg/lib/modules/*)" ] || vm_die "no lib/modules in $pkg"
  order=$(vm_module_order "$(echo "$tmp"/pkg/lib/modules/*)") || exit 125
  mkdir -p "$tmp/modules"
  while read -r name path; do
    i=$((i + 1))
    vm_copy_module "$path" "$tmp/modules/$(printf '%02d' $i)-$name.ko"
    printf '%02d-%s.ko\n' "$i" "$name" >>"$tmp/modules/order"
  done <<<"$order"
  cp "$tmp"/pkg/boot/vmlinuz-* "$tmp/vmlinuz"
  printf '%s\n' "$pkg" >"$tmp/kernel-package"
  rm -rf "$tmp/pkg"
  vm_publish "$tmp" "$dir"
  printf '%s\n' "$dir"
}

# Once per (kernel, init script, busybox): $VM_CACHE/initrd-<hash>.cpio. Prints its path.
vm_ensure_initramfs() {
  local kernel_dir=$1 key file tmp
  key=$(cat "$VM_DIR/init" "$kernel_dir/modules/order" /bin/busybox | sha256sum | cut -c1-12)
  file=$VM_CACHE/initrd-$key.cpio
  if [ -s "$file" ]; then printf '%s\n' "$file"; return 0; fi
  tmp=$(mktemp -d "$VM_CACHE/.initrd-build.XXXXXX")
  mkdir -p "$tmp/root"/{bin,dev,proc,sys,mnt,newroot}
  cp /bin/busybox "$tmp/root/bin/busybox"
  install -m 0755 "$VM_DIR/init" "$tmp/root/init"
  cp -r "$kernel_dir/modules" "$tmp/root/modules"
  (cd "$tmp/root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) >"$tmp/initrd.cpio" \
    || vm_die "cannot build the initramfs"
  mv -f "$tmp/initrd.cpio" "$file"
  rm -rf "$tmp"
  printf '%s\n' "$file"
}

# Move a freshly built directory into place; a concurrent run may have won the race: fine.
vm_publish() {
  local tmp=$1 dir=$2
  if ! mv -T "$tmp" "$dir" 2>/dev/null; then rm -rf "$tmp"; fi
}

# Runs killed hard leave their directories behind; drop those older than a day.
vm_prune_runs() {
  [ -d "$VM_CACHE/runs" ] && find "$VM_CACHE/runs" -mindepth 1 -maxdepth 1 -mmin +1440 -exec rm -rf {} + 2>/dev/null
  return 0
}
