#!/bin/sh
# The image's build stage: `image-install.sh SRC PREFIX` installs ESP mesh from the source tree SRC into PREFIX as
# the final image carries it, and nothing else:
#   PREFIX/venv  a virtualenv with the project (not editable) and its runtime dependencies, no dev extras, no pip;
#   PREFIX/gen   the generated gRPC code and the descriptor set (gen/esp.binpb, the gateway's), made as `make proto`
#                makes them, by buf and grpc_tools from a throw-away tools virtualenv;
#   PREFIX/bin   the entrypoint, esp-service;
# every module compiled to bytecode, since the image's root file system is read-only at run time.
#
# The Dockerfile runs it; tests/deploy/test_image.py runs it too, into a temporary PREFIX outside the repository,
# and starts services through PREFIX/bin/esp-service. For that test to stay fast, two variables swap the slow
# downloads for what `make install` already put in .venv (the image build sets neither):
#   ESP_IMAGE_DEPS_SITE  a site-packages directory holding the dependencies: the venv reads it through a .pth file
#                        and the project is installed alone (--no-deps, no build isolation);
#   ESP_IMAGE_TOOLS      a bin directory holding buf and a python with grpc_tools.
# A CA bundle mounted as the build secret `pip-ca` (scripts/image.sh passes the host's) is trusted by pip, for a
# builder behind a TLS-intercepting proxy.
set -eu

if [ "$#" -ne 2 ]; then
  echo "usage: image-install.sh SRC PREFIX" >&2
  exit 64
fi
src=$(cd "$1" && pwd)
prefix=$2
python=${PYTHON:-python3}
if [ -f /run/secrets/pip-ca ]; then
  export PIP_CERT=/run/secrets/pip-ca
fi
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

mkdir -p "$prefix/bin" "$prefix/gen"
venv_python="$prefix/venv/bin/python"

# The project and its runtime dependencies, from a wheel built from SRC (package data included, as pyproject.toml
# lists it): what an editable install would read from the source tree, the image must carry. With
# ESP_IMAGE_DEPS_SITE the venv gets no pip of its own: pip and setuptools come from that directory too.
if [ -n "${ESP_IMAGE_DEPS_SITE:-}" ]; then
  "$python" -m venv --without-pip "$prefix/venv"
  site=$("$venv_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$ESP_IMAGE_DEPS_SITE" >"$site/esp_image_deps.pth"
  "$venv_python" -m pip install --quiet --no-deps --no-build-isolation "$src"
else
  "$python" -m venv "$prefix/venv"
  site=$("$venv_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$venv_python" -m pip install --quiet "$src"
fi

# Generated code, with grpcio-tools at exactly the runtime's grpcio version: the generated modules refuse an older
# runtime, and the dev extras' own range could pick a newer one.
if [ -n "${ESP_IMAGE_TOOLS:-}" ]; then
  tools_bin=$ESP_IMAGE_TOOLS
  tools=""
else
  tools=$(mktemp -d)
  "$python" -m venv "$tools"
  tools_bin=$tools/bin
  grpc_version=$("$venv_python" -c 'import grpc; print(grpc.__version__)')
  buf_requirement=$("$python" - "$src/pyproject.toml" <<'PY'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    dev = tomllib.load(f)["project"]["optional-dependencies"]["dev"]
print(next(requirement for requirement in dev if requirement.startswith("buf-bin")))
PY
)
  "$tools_bin/python" -m pip install --quiet "grpcio-tools==$grpc_version" "$buf_requirement"
fi
(cd "$src" && "$tools_bin/buf" build -o "$prefix/gen/esp.binpb")
(cd "$src/proto" && find esp -name '*.proto' | sort | xargs "$tools_bin/python" -m grpc_tools.protoc \
  --descriptor_set_in="$prefix/gen/esp.binpb" --python_out="$prefix/gen" --grpc_python_out="$prefix/gen")
find "$prefix/gen/esp" -type d -exec touch {}/__init__.py \;
if [ -n "$tools" ]; then
  rm -rf "$tools"
fi
echo "$prefix/gen" >"$site/esp_gen.pth"

install -m 0755 "$src/scripts/esp-service" "$prefix/bin/esp-service"

# No installer at run time: nothing installs into a running container.
if [ -z "${ESP_IMAGE_DEPS_SITE:-}" ]; then
  "$venv_python" -m pip uninstall --quiet --yes pip setuptools
fi
"$venv_python" -m compileall -q -j 0 "$site" "$prefix/gen"
