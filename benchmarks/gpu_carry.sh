#!/usr/bin/env bash
# What the GPU machines lack for benchmarks/multi_gpu.py (issue 23), gathered here, in the repo's root:
#   benchmarks/gpu_carry.sh wheels   -> .whl/: the Python packages missing from the image, and redis-server
#   benchmarks/gpu_carry.sh pg       -> .pg/pg.tar.xz: this machine's PostgreSQL server, relocatable, with
#                                       the shared libraries it needs beyond glibc
# and there, on the GPU machine (as root), in the repo's root:
#   benchmarks/gpu_carry.sh install  -> the wheels into /tmp/site, llmbatch linked as /tmp/pkg, redis-server in /tmp/redis
#   benchmarks/gpu_carry.sh start-pg -> a PostgreSQL server from .pg on 127.0.0.1:5432; prints its URL
# after which `. benchmarks/gpu_env.sh` sets each call's environment.
# Both folders must be git-ignored (`echo /.whl/ >> .git/info/exclude; echo /.pg/ >> .git/info/exclude`).
# Carry .whl, or .pg, in a run (not both in one: 64 MiB a call); benchmarks/RESULTS.md, issue 23, has the commands.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-/work/main/.venv/bin/python}

case "${1:-}" in
wheels)
  # Versions as installed here; the image has click, jinja2, python-dateutil, torch, transformers, peft, ...
  names="bitsandbytes xgrammar sqlalchemy greenlet alembic mako celery kombu billiard vine amqp click-didyoumean
         click-repl click-plugins prompt-toolkit wcwidth redis tzlocal psycopg psycopg-binary
         jsonschema jsonschema-specifications referencing rpds-py"
  specs=$("$PY" -c 'import sys, importlib.metadata as m; print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $names)
  mkdir -p .whl
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform any -d .whl $specs
  # redis-server and the libraries it links beyond glibc (benchmarks/e2e_worker.py looks in .whl/redis).
  mkdir -p .whl/redis
  cp "$(command -v redis-server)" .whl/redis/
  ldd "$(command -v redis-server)" | awk '$3 ~ /^\// && $1 !~ /^(libc|libm|libpthread|libdl|librt)\.so/ {print $3}' |
    xargs -r cp -L -t .whl/redis/
  du -sh .whl
  ;;
pg)
  # The server keeps its Debian layout under pg/ (it finds share/ relative to its bin/), without the
  # LLVM JIT (jit=off); pg/lib holds the libraries `ldd postgres` names beyond glibc.
  ver=$(ls /usr/lib/postgresql | sort -n | tail -1)
  tmp=$(mktemp -d)
  mkdir -p "$tmp/pg/usr/lib/postgresql/$ver/bin" "$tmp/pg/usr/lib/postgresql/$ver/lib" "$tmp/pg/usr/share/postgresql" "$tmp/pg/lib"
  cp /usr/lib/postgresql/"$ver"/bin/{postgres,initdb,pg_ctl,pg_isready,psql} "$tmp/pg/usr/lib/postgresql/$ver/bin/"
  find /usr/lib/postgresql/"$ver"/lib -maxdepth 1 -name '*.so' ! -name 'llvmjit*' -exec cp {} "$tmp/pg/usr/lib/postgresql/$ver/lib/" \;
  cp -r /usr/share/postgresql/"$ver" "$tmp/pg/usr/share/postgresql/"
  for b in postgres initdb pg_ctl psql; do ldd /usr/lib/postgresql/"$ver"/bin/$b; done |
    awk '$3 ~ /^\// && $1 !~ /^(libc|libm|libpthread|libdl|librt|libresolv)\.so/ {print $3}' | sort -u |
    xargs -r cp -L -t "$tmp/pg/lib/"
  echo "$ver" > "$tmp/pg/VERSION"
  mkdir -p .pg
  tar -C "$tmp" -cJf .pg/pg.tar.xz pg
  rm -rf "$tmp"
  du -sh .pg/pg.tar.xz
  ;;
install)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  mkdir -p /tmp/pkg/llmbatch /tmp/redis
  for d in jobs worker migrations; do ln -sfn "$PWD/$d" "/tmp/pkg/llmbatch/$d"; done
  cp .whl/redis/* /tmp/redis/
  ;;
start-pg)
  # There (as root): unpack into /tmp/pg, start a server on 127.0.0.1:5432 with trust auth, database `bench`.
  # PostgreSQL refuses to run as root: a user `pgbench` owns the data folder.
  [ -d /tmp/pg ] || tar -C /tmp -xJf .pg/pg.tar.xz
  ver=$(cat /tmp/pg/VERSION)
  bin=/tmp/pg/usr/lib/postgresql/$ver/bin
  export LD_LIBRARY_PATH=/tmp/pg/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  id pgbench >/dev/null 2>&1 || useradd -M -s /bin/sh pgbench
  chmod -R a+rX /tmp/pg
  mkdir -p /tmp/pgdata /tmp/pgsock && chown pgbench /tmp/pgdata /tmp/pgsock
  as() { su pgbench -s /bin/sh -c "LD_LIBRARY_PATH=$LD_LIBRARY_PATH $*"; }
  [ -f /tmp/pgdata/PG_VERSION ] || as "$bin/initdb -D /tmp/pgdata -U postgres -A trust -E UTF8 --locale=C.UTF-8 >/tmp/pgdata.initdb.log 2>&1" ||
    as "$bin/initdb -D /tmp/pgdata -U postgres -A trust -E UTF8 --locale=C >/tmp/pgdata.initdb.log 2>&1"
  as "$bin/pg_ctl -D /tmp/pgdata -l /tmp/pgdata.log -w start -o '-c listen_addresses=127.0.0.1 -p ${PGPORT:-5432} -k /tmp/pgsock -c jit=off -c max_connections=200'"
  as "$bin/psql -h 127.0.0.1 -p ${PGPORT:-5432} -U postgres -d postgres -qc 'CREATE DATABASE bench'" 2>/dev/null || true
  echo "postgresql+psycopg://postgres@127.0.0.1:${PGPORT:-5432}/bench"
  ;;
*)
  echo "usage: $0 wheels|pg|install|start-pg" >&2
  exit 2
  ;;
esac
