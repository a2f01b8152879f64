#!/usr/bin/env bash
# Packs the optional Hopper kernel packages (flash-attn-4, quack-kernels, the CuTe DSL) for the
# GPU machine, which has no network and takes at most 64 MiB per call with the repo.
#
#   bash bench/carry_kernels.sh [DIR]        # here, from the repo root; DIR defaults to .kernel-carry
#
# Downloads pinned cp312 manylinux x86_64 wheels into DIR/wheels (not carried), then fills
#   DIR/call1: the first half of the 92 MB nvidia-cutlass-dsl-libs-cu13 wheel, cut in two;
#   DIR/call2: its second half and every other wheel.
# Each call folder also holds PARTS (the pieces to join) and SHA256SUMS (of the joined wheel).
# The device side is bench/install_kernels.sh. DIR must be ignored by git (.gitignore has it).
set -euo pipefail

DIR=${1:-.kernel-carry}
LIMIT_MIB=55  # per call, leaving room for the repo itself under the 64 MiB limit
PACKAGES=(
  flash-attn-4==4.0.0b36
  quack-kernels==0.6.5
  nvidia-cutlass-dsl==4.8.1
  nvidia-cutlass-dsl-libs-base==4.8.1
  nvidia-cutlass-dsl-libs-core==4.8.1
  nvidia-cutlass-dsl-libs-cu13==4.8.1
  apache-tvm-ffi==0.1.15.post2
  torch-c-dlpack-ext==0.1.5
)
BIG=nvidia_cutlass_dsl_libs_cu13

mkdir -p "$DIR/wheels"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --pre --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$DIR/wheels" "${PACKAGES[@]}"

rm -rf "$DIR/call1" "$DIR/call2"
mkdir -p "$DIR/call1" "$DIR/call2"
big=$(ls "$DIR"/wheels/${BIG}-*.whl)
name=$(basename "$big")
( cd "$DIR/wheels" && split -n 2 -d "$name" "../call1/$name.part" )
mv "$DIR/call1/$name.part01" "$DIR/call2/"
for f in "$DIR"/wheels/*.whl; do
  [ "$f" = "$big" ] || cp "$f" "$DIR/call2/"
done
( cd "$DIR/wheels" && sha256sum "$name" ) > "$DIR/call1/SHA256SUMS"
printf '%s\n' "$name.part00" "$name.part01" > "$DIR/call1/PARTS"
cp "$DIR/call1/SHA256SUMS" "$DIR/call1/PARTS" "$DIR/call2/"

status=0
for c in call1 call2; do
  mib=$(( $(du -sb "$DIR/$c" | cut -f1) / 1048576 ))
  echo "$DIR/$c: ${mib} MiB"
  if [ "$mib" -gt "$LIMIT_MIB" ]; then echo "  over ${LIMIT_MIB} MiB" >&2; status=1; fi
done
exit $status
