# Shared by scripts/*: install what Lanyard's scripts need on a fresh Debian machine.
# Sourced, not run.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="$HOME/.cargo/bin:$PATH"

# apt_need PKG... : install the Debian packages that are missing.
apt_need() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "==> installing ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# venv_requirements FILE [VENV]: make VENV (default $ROOT/.venv) hold exactly the pinned versions in FILE.
venv_requirements() {
    local venv=${2:-$ROOT/.venv}
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv"
    fi
    local stamp="$venv/.requirements.sha256"
    local want; want=$(sha256sum "$1" | cut -d' ' -f1)
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && return 0
    echo "==> pip installing the pinned versions of $1"
    "$venv/bin/pip" install -q -r "$1"
    echo "$want" >"$stamp"
}

# need_rust: the build needs a rustup toolchain of at least the workspace's
# rust-version (Debian's cargo is too old), a C compiler and libc headers
# (aws-lc-sys), and CA roots (curl is installed without recommends).
need_rust() {
    apt_need ca-certificates gcc libc6-dev
    local want have
    want=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -1)
    if ! command -v cargo >/dev/null || ! command -v rustc >/dev/null; then
        echo "error: cargo is missing: install a Rust toolchain >= $want with rustup (https://rustup.rs), with the rustfmt and clippy components" >&2
        exit 1
    fi
    have=$(rustc --version | awk '{print $2}')
    if [ "$(printf '%s\n%s\n' "$want" "$have" | sort -V | head -1)" != "$want" ]; then
        echo "error: rustc $have is older than the workspace's rust-version $want: \`rustup update\`, or install rustup (https://rustup.rs)" >&2
        exit 1
    fi
}
need_rust

# check_versions FILE : print each package's installed version and stop when
# one lacks the upstream version prefix FILE pins for it.
check_versions() {
    local pkg want have upstream bad=0
    while read -r pkg want; do
        case "$pkg" in ''|'#'*) continue ;; esac
        have=$(dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null || true)
        upstream=${have#*:}          # no epoch
        upstream=${upstream%-*}      # no Debian revision
        if [ -z "$have" ]; then
            printf '  %-15s %-32s MISSING (want %s*)\n' "$pkg" "-" "$want"; bad=1
        elif [ "${upstream#"$want"}" = "$upstream" ]; then
            printf '  %-15s %-32s WRONG (want %s*)\n' "$pkg" "$have" "$want"; bad=1
        else
            printf '  %-15s %s\n' "$pkg" "$have"
        fi
    done <"$1"
    if [ "$bad" -ne 0 ]; then
        echo "error: the packages marked above differ from $1: install those versions, or run the suite on the new ones and update $1" >&2
        exit 1
    fi
}
