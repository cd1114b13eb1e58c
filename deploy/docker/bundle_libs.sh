#!/usr/bin/env bash
# Copies the shared libraries an executable loads into one folder, so that a runtime image needs
# no list of runtime packages (their names differ from one Ubuntu release to the next). Fails
# when a library cannot be found.
#   deploy/docker/bundle_libs.sh EXECUTABLE DEST_DIR [SKIP_PREFIX...]
# Left out: glibc and the GCC runtime (the runtime image, of the same release, has them), the
# NVIDIA driver's libraries (libcuda, NVML: the container runtime mounts the host's, which must
# match its kernel module; they may be missing at build time), and any library whose path starts
# with a SKIP_PREFIX (e.g. /opt/pytorch, a libtorch copied whole; /usr/local/cuda, which also
# matches /usr/local/cuda-13.0: the toolkit libraries that the CUDA runtime image has).
set -euo pipefail
exe=$1
dest=$2
shift 2
mkdir -p "$dest"

skipped_name() {
  case "$1" in
    ld-linux*|libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*|libresolv.so.*|libutil.so.*) return 0 ;;
    libstdc++.so.*|libgcc_s.so.*) return 0 ;;
    libcuda.so.*|libnvidia-*.so.*) return 0 ;;
  esac
  return 1
}

deps=$(ldd "$exe")
missing=$(awk '$2 == "=>" && $3 == "not" {print $1}' <<<"$deps" | while read -r name; do
  skipped_name "$name" || echo "$name"
done)
if [ -n "$missing" ]; then
  echo "bundle_libs: $exe needs libraries that are not installed: $missing" >&2
  exit 1
fi

count=0
while read -r name path; do
  skipped_name "$name" && continue
  for prefix in "$@"; do
    case "$path" in "$prefix"*) continue 2 ;; esac
  done
  cp -L "$path" "$dest/$name"
  count=$((count + 1))
done < <(awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' <<<"$deps")
echo "bundle_libs: copied $count libraries that $exe loads into $dest"
