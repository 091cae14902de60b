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

# venv_requirements FILE : make $ROOT/.venv hold exactly the pinned versions in FILE.
venv_requirements() {
    if [ ! -x "$ROOT/.venv/bin/python" ]; then
        python3 -m venv "$ROOT/.venv"
    fi
    local stamp="$ROOT/.venv/.requirements.sha256"
    local want; want=$(sha256sum "$1" | cut -d' ' -f1)
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && return 0
    echo "==> pip installing the pinned versions of $1"
    "$ROOT/.venv/bin/pip" install -q -r "$1"
    echo "$want" >"$stamp"
}
