# shellcheck shell=bash
# Host-side preparation for test/vm/run: tools, a Debian kernel and a tiny initramfs.
# Sourced by test/vm/run; expects VM_CACHE (the repo's .vm/ directory) and VM_DIR (test/vm).
# Everything is cached under $VM_CACHE/boot-<hash>/, so a second run touches no registry.

# Modules the guest needs; their dependencies are resolved from each .ko's "depends=" field.
# crc32c_generic goes first: ext4/jbd2/libcrc32c only name it as a soft dependency.
VM_WANTED_MODULES="crc32c_generic virtio_pci virtio-rng 9pnet_virtio 9p overlay loop dm-thin-pool ext4"
VM_HOST_PACKAGES="qemu-system-x86 busybox-static cpio"

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

vm_ensure_host_tools() {
  local missing=()
  command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
  vm_have_static_busybox || missing+=(busybox-static)
  command -v cpio >/dev/null || missing+=(cpio)
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
  esac | strings | sed -n "s/^$field=//p" | head -n1
}

vm_copy_module() {
  local src=$1 dst=$2
  case "$src" in
    *.xz) xz -dc "$src" >"$dst" ;;
    *.zst) zstd -qdc "$src" >"$dst" ;;
    *) cp "$src" "$dst" ;;
  esac
}

# Build (once) $VM_CACHE/boot-<hash>/{vmlinuz,initramfs.cpio}; prints that directory.
vm_ensure_boot_files() {
  local key dir tmp pkg deb kroot moddir i=0 name path
  key=$(cat "$VM_DIR/init" "$VM_DIR/lib/prepare.sh" | sha256sum | cut -c1-16)
  dir=$VM_CACHE/boot-$key
  if [ -s "$dir/vmlinuz" ] && [ -s "$dir/initramfs.cpio" ]; then
    printf '%s\n' "$dir"; return 0
  fi
  mkdir -p "$VM_CACHE"
  tmp=$(mktemp -d "$VM_CACHE/.boot-build.XXXXXX")
  pkg=$(vm_kernel_package)
  vm_log "downloading $pkg"
  (cd "$tmp" && apt-get download -q "$pkg" >&2 2>/dev/null) \
    || (vm_apt_update_once; cd "$tmp" && apt-get download -q "$pkg" >&2) \
    || vm_die "apt-get download $pkg failed"
  deb=$(ls "$tmp"/*.deb)
  kroot=$tmp/pkg
  dpkg -x "$deb" "$kroot"
  rm -f "$deb"

  local initrd=$tmp/initrd
  mkdir -p "$initrd"/{bin,dev,proc,sys,mnt,newroot,modules}
  cp /bin/busybox "$initrd/bin/busybox"
  cp "$VM_DIR/init" "$initrd/init"
  chmod 0755 "$initrd/init"
  moddir=$(echo "$kroot"/lib/modules/*)
  [ -d "$moddir" ] || vm_die "no lib/modules in $pkg"
  : >"$initrd/modules/order"
  while read -r name path; do
    i=$((i + 1))
    vm_copy_module "$path" "$initrd/modules/$(printf '%02d' $i)-$name.ko"
    printf '%02d-%s.ko\n' "$i" "$name" >>"$initrd/modules/order"
  done < <(vm_module_order "$moddir")
  (cd "$initrd" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) >"$tmp/initramfs.cpio"
  cp "$kroot"/boot/vmlinuz-* "$tmp/vmlinuz"
  printf '%s\n' "$pkg" >"$tmp/kernel-package"
  rm -rf "$kroot" "$initrd"
  # Publish atomically; a concurrent run may have won the race, which is fine.
  if ! mv -T "$tmp" "$dir" 2>/dev/null; then rm -rf "$tmp"; fi
  vm_log "boot files ready in $dir ($(cat "$dir/kernel-package"))"
  printf '%s\n' "$dir"
}
