#!/bin/sh
# Build an aarch64 Python + TVM runtime sysroot to run `onnxpress compile --target arm64-linux`
# libraries under qemu-user on an x86 Debian 12 machine (no board needed; timings meaningless).
#   sh tools/setup_arm_emulator.sh [DIR]        (default DIR: build/arm-emulator; needs root)
# Then: python tools/arm_emulate.py OUT_FOLDER --inputs x.npz --verify model.onnx
set -eu
DIR=${1:-build/arm-emulator}
mkdir -p "$DIR/debs" "$DIR/sysroot" "$DIR/site"
DIR=$(cd "$DIR" && pwd)
apt-get install -y --no-install-recommends qemu-user gcc-aarch64-linux-gnu g++-aarch64-linux-gnu
dpkg --add-architecture arm64
apt-get update
cd "$DIR/debs"
apt-get download python3.11-minimal:arm64 libpython3.11-minimal:arm64 libpython3.11-stdlib:arm64 \
  libc6:arm64 libexpat1:arm64 zlib1g:arm64 libffi8:arm64 libssl3:arm64 libbz2-1.0:arm64 \
  liblzma5:arm64 libsqlite3-0:arm64 libgcc-s1:arm64 libstdc++6:arm64 libncursesw6:arm64 \
  libtinfo6:arm64 libreadline8:arm64 libuuid1:arm64 libcrypt1:arm64 libnsl2:arm64 \
  libtirpc3:arm64 libdb5.3:arm64 libgssapi-krb5-2:arm64 libkrb5-3:arm64 libk5crypto3:arm64 \
  libkrb5support0:arm64 libcom-err2:arm64 libkeyutils1:arm64 media-types
for deb in *.deb; do dpkg -x "$deb" "$DIR/sysroot"; done
cd "$DIR"
PY=${PYTHON:-python3}
"$PY" -m pip download --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
  --python-version 3.11 -d wheels apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 \
  numpy==2.4.6 ml_dtypes==0.5.4 typing_extensions==4.16.0
for whl in wheels/*.whl; do "$PY" -m zipfile -e "$whl" site; done
echo "aarch64 sysroot ready in $DIR"
