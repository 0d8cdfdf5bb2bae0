"""Logs, traces and the audit log (include/drun/log.hpp, trace.hpp, audit.hpp) through the CLI:
JSON lines in the OpenTelemetry shape from a leecher and a seed in separate processes, joined by
trace id; trace context from --traceparent and TRACEPARENT, and through an old peer; secrets in
no output at the most verbose level; every security decision in the audit log, and every kind of
tampering with it detected by `drun audit verify`."""

import json
import os
import re
import subprocess

import pytest

from conftest import flip_byte
from test_fetch import Tinyproxy, nginx, node_key, published  # noqa: F401 (fixtures)
from test_peers import N, LyingPeer, manifest_json, swarm, write_policy  # noqa: F401 (swarm is a fixture)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
HEX32, HEX16 = re.compile(r"^[0-9a-f]{32}$"), re.compile(r"^[0-9a-f]{16}$")


def json_lines(text):
    """Every stderr line of a command run with --log-format json, parsed and checked for shape."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)  # every line is JSON: nothing else shares the stream
        assert set(rec) >= {"timestamp", "severity_text", "severity_number", "body", "attributes", "resource"}, rec
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$", rec["timestamp"]), rec
        assert (rec["severity_text"], rec["severity_number"]) in {("DEBUG", 5), ("INFO", 9), ("WARN", 13),
                                                                 ("ERROR", 17)}, rec
        res = rec["resource"]
        assert res["service.name"] == "drun" and res["process.pid"] > 0 and res["host.name"], res
        if "trace_id" in rec:
            assert HEX32.match(rec["trace_id"]) and HEX16.match(rec["span_id"]) and rec["trace_flags"] == "01", rec
        out.append(rec)
    return out


LOG = ["--log-format", "json", "--log-level", "info"]


def test_leecher_and_seed_log_json_lines_that_join_by_trace_id(swarm):  # noqa: F811
    seed = swarm.serve(extra=LOG)
    leech = swarm.fetch(seed.addr, extra=[*LOG, "--traceparent", TRACEPARENT]).ok()
    seed.stop()
    mine, theirs = json_lines(leech.err), json_lines(seed.err)
    started = [r for r in mine if r["body"] == "fetch started"]
    done = [r for r in mine if r["body"] == "fetch completed"]
    assert len(started) == 1 and len(done) == 1, mine
    assert done[0]["trace_id"] == TRACE_ID and done[0]["attributes"]["pieces"] == N
    assert done[0]["attributes"]["artifact"] == swarm.artifact
    # The fetch is a child span of the caller's: same trace, a span of its own.
    assert done[0]["span_id"] != TRACEPARENT.split("-")[2]
    served = [r for r in theirs if r["body"] == "connection closed" and r.get("trace_id") == TRACE_ID]
    assert served, theirs
    assert sum(r["attributes"]["pieces"] for r in served) == N
    assert all(r["attributes"]["caller"] == "spiffe://cluster/ns/ml/sa/loader" for r in served)
    # The seed's spans are its own, in the leecher's trace.
    assert {r["span_id"] for r in served}.isdisjoint({done[0]["span_id"]})


def test_trace_context_from_the_environment_or_new(swarm, drun):  # noqa: F811
    seed = swarm.serve(extra=LOG)
    env_trace = "0af7651916cd43dd8448eb211c80319c"
    old = os.environ.get("TRACEPARENT")
    os.environ["TRACEPARENT"] = f"00-{env_trace}-b7ad6b7169203331-01"
    try:
        a = swarm.fetch(seed.addr, store="a", extra=LOG).ok()
        os.environ["TRACEPARENT"] = "not a traceparent"
        b = swarm.fetch(seed.addr, store="b", extra=LOG).ok()  # ignored, with a warning: W3C says so
    finally:
        if old is None:
            del os.environ["TRACEPARENT"]
        else:
            os.environ["TRACEPARENT"] = old
    seed.stop()
    done_a = [r for r in json_lines(a.err) if r["body"] == "fetch completed"][0]
    assert done_a["trace_id"] == env_trace
    lines_b = json_lines(b.err)
    assert any("TRACEPARENT is ignored" in r["body"] for r in lines_b), lines_b
    done_b = [r for r in lines_b if r["body"] == "fetch completed"][0]
    assert done_b["trace_id"] not in (env_trace, "0" * 32)
    seen = {r.get("trace_id") for r in json_lines(seed.err) if r["body"] == "connection closed"}
    assert env_trace in seen and done_b["trace_id"] in seen


@pytest.mark.parametrize("bad", ["garbage", f"00-{TRACE_ID.upper()}-00f067aa0ba902b7-01",
                                 f"00-{'0' * 32}-00f067aa0ba902b7-01", f"00-{TRACE_ID}-{'0' * 16}-01",
                                 f"ff-{TRACE_ID}-00f067aa0ba902b7-01", TRACEPARENT + "-extra"])
def test_a_malformed_traceparent_flag_is_a_usage_error(swarm, bad):  # noqa: F811
    swarm.fetch("127.0.0.1:1", extra=["--traceparent", bad]).fails(2, "traceparent")


def test_a_peer_from_before_version_2_is_spoken_to_in_version_1(swarm, drun):  # noqa: F811
    """A server that predates the trace context refuses a version 2 HELLO as malformed; the
    client says it again in version 1 and fetches (here: from a liar, which it then bans)."""
    liar = LyingPeer(swarm.pki, swarm.model, swarm.sig, manifest_json(drun, swarm.sig), strict_v1=True)
    seed = swarm.serve()
    try:
        r = swarm.fetch(liar.addr, seed.addr, extra=LOG).ok()
    finally:
        liar.stop()
        seed.stop()
    assert liar.hellos[:2] == [2, 1], liar.hellos
    assert all(v == 1 for v in liar.hellos[1:]), liar.hellos
    assert any(x["body"].startswith("piece rejected") for x in json_lines(r.err))
    assert "banned" in r.out


def test_text_logs_by_default_and_levels_and_bad_values(swarm, drun):  # noqa: F811
    seed = swarm.serve()
    quiet = swarm.fetch(seed.addr, store="q").ok()
    assert quiet.err == ""  # the default level (warning) says nothing about a fetch that went well
    loud = swarm.fetch(seed.addr, store="l", extra=["--log-level", "debug"]).ok()
    assert re.search(r"^drun: fetch completed \(artifact=", loud.err, re.M), loud.err
    assert re.search(r"^drun: debug: piece stored", loud.err, re.M), loud.err
    seed.stop()
    drun("cache", "ls", "--store", swarm.tmp / "q", "--key-source", swarm.ks, "--log-format", "xml").fails(2, "--log-format")
    drun("cache", "ls", "--store", swarm.tmp / "q", "--key-source", swarm.ks, "--log-level", "loud").fails(2, "--log-level")
    # A usage error under --log-format json is a JSON line too.
    bad = drun("cache", "ls", "--log-format", "json", "--no-such-option")
    assert bad.rc == 2
    (line,) = json_lines(bad.err)
    assert line["severity_text"] == "ERROR" and "--no-such-option" in line["body"]
    assert line["attributes"]["command"] == "cache"
    # The logging options may also come before the command.
    before = drun("--log-format", "json", "cache", "ls", "--no-such-option")
    assert before.rc == 2 and json_lines(before.err)[0]["attributes"]["command"] == "cache"
    # An insecure option's warning shows at every level, JSON included.
    warned = swarm.fetch("127.0.0.1:1", store="w", extra=["--log-format", "json", "--log-level", "error",
                                                          "--rdma", "--attempts", "1"])
    assert any(r["body"].startswith("WARNING: --rdma") for r in json_lines(warned.err)), warned.err


def test_no_secret_appears_at_the_most_verbose_level(swarm, drun, drun_keys, tmp_path):  # noqa: F811
    """Every command the secrets pass through, at --log-level debug in both formats, with an audit
    log: the node key, the token, the token signing key and the audit key are in no output."""
    ed_key, ed_pub = drun_keys["ed25519"]
    jwks = tmp_path / "jwks.json"
    jwks.write_text(drun("token", "jwks", "--public-key", ed_pub).ok().out)
    token = drun("token", "issue", "--key", ed_key, "--subject", "loader", "--audience", "drun", "--artifact",
                 swarm.artifact, "--bind-cert", swarm.client_cert).ok().out.strip()
    token_file = tmp_path / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    audit_key = tmp_path / "audit.key"
    drun("keygen", "--type", "ed25519", "--out", audit_key).ok()
    node_key = (tmp_path / "node.key").read_text().strip()
    secrets = {"token": token, "token signature": token.rsplit(".", 1)[1], "node key": node_key,
               "token key": pem_body(ed_key), "audit key": pem_body(audit_key)}
    outputs = []
    for fmt in ("text", "json"):
        verbose = ["--log-format", fmt, "--log-level", "debug"]
        audit = ["--audit-log", tmp_path / f"audit-{fmt}.log", "--audit-key", audit_key]
        seed = swarm.serve(extra=[*verbose, *audit, "--jwks", jwks])
        outputs += [swarm.fetch(seed.addr, store=f"s-{fmt}", extra=[*verbose, *audit, "--token-file", token_file]).ok()]
        # A refused token is logged and audited: by reason, never by value.
        bad = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        bad_file = tmp_path / f"bad-{fmt}"
        bad_file.write_text(bad)
        bad_file.chmod(0o600)
        refused = swarm.fetch(seed.addr, store=f"b-{fmt}", extra=[*verbose, "--token-file", bad_file])
        assert refused.rc != 0, refused
        outputs += [refused]
        secrets[f"bad token {fmt}"] = bad
        store = ["--store", tmp_path / f"s-{fmt}", "--key-source", swarm.ks]
        for cmd in (["cache", "ls"], ["cache", "verify"], ["cache", "show", swarm.artifact[:12]]):
            outputs += [drun(*cmd, *store, *verbose, *audit).ok()]
        outputs += [drun("verify", swarm.model, "--signature", swarm.sig, "--public-key", swarm.pub, *verbose,
                         *audit).ok()]
        seed.stop()
        outputs += [seed]
    texts = [o.out + o.err for o in outputs] + [(tmp_path / f"audit-{f}.log").read_text() for f in ("text", "json")]
    assert any("token refused" in t for t in texts)  # the refusal was there to be logged
    for name, secret in secrets.items():
        for t in texts:
            assert secret not in t, f"the {name} appears in the output"


def test_no_origin_credential_or_store_key_appears_at_the_most_verbose_level(drun, tmp_path, published, nginx,  # noqa: F811
                                                                              node_key):  # noqa: F811
    """Through a proxy that wants credentials, with a header and a bearer token for the origin,
    then the cache commands that handle store keys: nothing secret in any output or log."""
    m, sig, pub = published
    proxy = Tinyproxy(tmp_path, auth=("drun", "pr0xy-pa55-91"))
    creds = tmp_path / "proxy-auth"
    creds.write_text("drun:pr0xy-pa55-91\n")
    creds.chmod(0o600)
    headers = tmp_path / "headers"
    headers.write_text("X-Api-Key: hdr-s3cr3t-77\n")
    headers.chmod(0o600)
    os.environ["DRUN_TEST_BEARER"] = "b3arer-t0ken-55"
    new_key = tmp_path / "new.key"
    drun("cache", "keygen", "--out", new_key).ok()
    audit_key = tmp_path / "audit.key"
    drun("keygen", "--type", "ed25519", "--out", audit_key).ok()
    secrets = ["pr0xy-pa55-91", "hdr-s3cr3t-77", "b3arer-t0ken-55", (tmp_path / "node.key").read_text().strip(),
               new_key.read_text().strip(), pem_body(audit_key)]
    texts = []
    try:
        for fmt in ("text", "json"):
            verbose = ["--log-format", fmt, "--log-level", "debug", "--audit-log", tmp_path / "audit.log",
                       "--audit-key", audit_key]
            store = tmp_path / f"s-{fmt}"
            r = drun("fetch", "--signature", sig, "--public-key", pub, "--store", store, "--key-source", node_key,
                     "--origin", nginx.url(), "--proxy", f"http://127.0.0.1:{proxy.port}", "--proxy-auth-file", creds,
                     "--header-file", headers, "--bearer-env", "DRUN_TEST_BEARER", "--metrics-file",
                     tmp_path / "m.prom", *verbose).ok()
            texts += [r.out + r.err, (tmp_path / "m.prom").read_text()]
            ks = ["--store", store, "--key-source", node_key]
            for cmd in (["cache", "import", m, "--signature", sig, "--public-key", pub],
                        ["cache", "export", published_id(drun, sig), tmp_path / f"out-{fmt}"], ["cache", "gc", "--ttl", "86400"]):
                texts.append(str(drun(*cmd, *ks, *verbose).ok()))
            r = drun("cache", "rotate-key", *ks, "--new-key-source", f"file:{new_key}", *verbose).ok()
            texts.append(str(r))
    finally:
        proxy.stop()
        del os.environ["DRUN_TEST_BEARER"]
    texts.append((tmp_path / "audit.log").read_text())
    assert any("fetch completed" in t for t in texts)
    for secret in secrets:
        for t in texts:
            assert secret not in t, f"{secret[:12]}... appears in the output"


def published_id(drun, sig):
    return json.loads(drun("manifest", sig, "--json").ok().out)["artifact_id"]


def pem_body(path):
    """The base64 of a PEM file's body."""
    lines = [ln for ln in open(path).read().splitlines() if ln and not ln.startswith("-----")]
    return "".join(lines)


# ------------------------------------------------------------------------------------------------
# the audit log


def events(path):
    return [json.loads(line) for line in open(path).read().splitlines()]


def test_every_security_decision_is_audited_and_the_logs_verify(swarm, drun, tmp_path):  # noqa: F811
    akey = tmp_path / "audit.key"
    drun("keygen", "--type", "ed25519", "--out", akey).ok()
    apub = f"{akey}.pub"
    seed_log, leech_log, cache_log = tmp_path / "seed.audit", tmp_path / "leech.audit", tmp_path / "cache.audit"
    audit = lambda f: ["--audit-log", f, "--audit-key", akey]  # noqa: E731
    policy = write_policy(tmp_path / "policy.json",
                          [{"certificate": {"uri": "spiffe://cluster/ns/ml/sa/loader"}, "roles": ["reader"]}],
                          {"reader": {"artifacts": [swarm.artifact]}})
    seed = swarm.serve(extra=[*audit(seed_log), "--policy", policy])
    swarm.fetch(seed.addr, extra=audit(leech_log)).ok()
    # Another artifact id: denied, and so recorded.
    other = "ab" * 32
    swarm.fetch(seed.addr, store="x", extra=["--artifact", other, *audit(leech_log)]).fails((3, 4))
    seed.stop()
    store = ["--store", tmp_path / "leech", "--key-source", swarm.ks]
    data = max((tmp_path / "leech" / "artifacts").glob("*/data/*"), key=lambda p: p.stat().st_size)
    flip_byte(data, 300 << 10)
    drun("cache", "verify", *store, *audit(cache_log)).fails(1)
    drun("cache", "keygen", "--out", tmp_path / "node2.key").ok()
    drun("cache", "rotate-key", *store, "--new-key-source", f"file:{tmp_path / 'node2.key'}", *audit(cache_log)).ok()
    store2 = ["--store", tmp_path / "leech", "--key-source", f"file:{tmp_path / 'node2.key'}"]
    drun("cache", "import", swarm.model, "--signature", swarm.sig, "--public-key", swarm.pub, *store2,
         *audit(cache_log)).ok()
    drun("cache", "rm", swarm.artifact, *store2, *audit(cache_log)).ok()

    seed_ev, leech_ev, cache_ev = events(seed_log), events(leech_log), events(cache_log)
    granted = [e for e in seed_ev if e["event"] == "peer.granted"]
    assert granted and granted[0]["data"] == {"caller": "spiffe://cluster/ns/ml/sa/loader", "artifact": swarm.artifact}
    denied = [e for e in seed_ev if e["event"] == "peer.denied"]
    assert denied and denied[0]["data"]["artifact"] == other and "reader" not in denied[0]["data"]["caller"]
    verified = [e for e in leech_ev if e["event"] == "bundle.verified"]
    assert verified[0]["data"]["artifact"] == swarm.artifact and verified[0]["data"]["signer.method"] == "key"
    assert len(verified[0]["data"]["signer.key_hint"]) == 64
    completed = [e for e in leech_ev if e["event"] == "fetch.completed"][0]
    done = completed["data"]
    assert done["pieces_from_peers"] == N and done["pieces_from_origins"] == 0 and done["peers_banned"] == ""
    assert re.match(r"^[0-9a-f]{32}$", completed["trace_id"])
    kinds = [e["event"] for e in cache_ev]
    for k in ("store.scrub_finding", "store.key_rotated", "bundle.verified", "store.imported", "store.removed"):
        assert k in kinds, kinds
    # Every process closed its log with a checkpoint; each log verifies.
    for log in (seed_log, leech_log, cache_log):
        assert events(log)[-1]["event"] == "checkpoint"
        r = drun("audit", "verify", log, "--public-key", apub).ok()
        assert "chain intact" in r.out
    shown = drun("audit", "show", cache_log, "--artifact", swarm.artifact[:10]).ok().out
    assert "store.imported" in shown and "checkpoint" not in shown
    as_json = drun("audit", "show", leech_log, "--json", "--since", "1h").ok().out.splitlines()
    assert [json.loads(x)["seq"] for x in as_json] == [e["seq"] for e in leech_ev]
    assert drun("audit", "show", leech_log, "--since", "2000-01-01T00:00:00Z").ok().out.count("\n") == len(leech_ev)
    assert drun("audit", "show", leech_log, "--since", "2999-01-01T00:00:00Z").ok().out == ""


@pytest.fixture
def audit_log(drun, swarm, tmp_path):  # noqa: F811
    """A log of 10 records by `drun verify` (with checkpoints every 3), and its keys."""
    akey = tmp_path / "audit.key"
    drun("keygen", "--type", "ed25519", "--out", akey).ok()
    log = tmp_path / "a.log"
    for _ in range(4):
        drun("verify", swarm.model, "--signature", swarm.sig, "--public-key", swarm.pub, "--audit-log", log,
             "--audit-key", akey, "--audit-checkpoint-every", "3").ok()
    lines = log.read_text().splitlines()
    assert len(lines) >= 8, lines
    return log, akey, f"{akey}.pub", lines


def rewrite(path, lines, torn_tail=None):
    path.write_text("".join(x + "\n" for x in lines) + (torn_tail or ""))


def test_the_audit_log_shows_every_kind_of_tampering(drun, audit_log, drun_keys, tmp_path):
    log, akey, apub, lines = audit_log
    verify = lambda: drun("audit", "verify", log, "--public-key", apub)  # noqa: E731
    verify().ok()
    head = tmp_path / "a.log.head"
    assert head.exists()
    cases = {
        "edited": ([lines[0].replace('"subject":"', '"subject":"x')] + lines[1:], "line 1", "edited"),
        "deleted": (lines[:1] + lines[2:], "line 2", "deleted, inserted or moved"),
        "inserted": (lines[:2] + [lines[0]] + lines[2:], "line 3", "deleted, inserted or moved"),
        "reordered": (lines[:1] + [lines[2], lines[1]] + lines[3:], "line 2", "deleted, inserted or moved"),
        "not a record": (lines[:1] + ["hello"] + lines[1:], "line 2", "not an audit record"),
        "truncated before the last checkpoint": (lines[:3], "truncated"),
        "first record removed": (lines[1:], "line 1"),
    }
    for name, (tampered, *fragments) in cases.items():
        rewrite(log, tampered)
        assert verify().fails(1, *fragments), name
        rewrite(log, lines)
    # A forged checkpoint: signed by another Ed25519 key, or its count changed and re-signed... by
    # no one (the signature then fails), or its signature replaced.
    cp = next(i for i, x in enumerate(lines) if '"event":"checkpoint"' in x)
    other_key = tmp_path / "other.key"
    drun("keygen", "--type", "ed25519", "--out", other_key).ok()
    forged = json.loads(lines[cp])
    sig = forged["signature"]
    rewrite(log, lines[:cp] + [lines[cp].replace(sig, sig[:-4] + ("AAA=" if sig[-4:] != "AAA=" else "BBB="))] + lines[cp + 1:])
    verify().fails(1, f"line {cp + 1}", "checkpoint")
    rewrite(log, lines[:cp] + [lines[cp].replace('"records":', '"records":1')] + lines[cp + 1:])
    verify().fails(1, f"line {cp + 1}")
    rewrite(log, lines)
    # The wrong public key: every checkpoint is "forged".
    drun("audit", "verify", log, "--public-key", f"{other_key}.pub").fails(1, "checkpoint")
    # Cutting every record after a checkpoint, the checkpoint included: the head file shows it.
    rewrite(log, lines[:cp])
    verify().fails(1, "truncated")
    rewrite(log, lines)
    verify().ok()


def test_a_torn_last_line_is_reported_and_the_next_writer_continues_after_it(drun, audit_log, swarm):  # noqa: F811
    log, akey, apub, lines = audit_log
    rewrite(log, lines, torn_tail=lines[-2][:40])
    r = drun("audit", "verify", log, "--public-key", apub).ok()
    assert "torn" in r.err and f"line {len(lines) + 1}" in r.err
    drun("verify", swarm.model, "--signature", swarm.sig, "--public-key", swarm.pub, "--audit-log", log,
         "--audit-key", akey).ok()
    r = drun("audit", "verify", log, "--public-key", apub).ok()
    assert f"line {len(lines) + 1} is a torn record" in r.err and "the chain continues after it" in r.err
    after = json.loads(log.read_text().splitlines()[len(lines) + 1])
    assert after["after_torn"] == 1 and after["seq"] == json.loads(lines[-1])["seq"] + 1
    # A torn line in the middle that the next record does not step over is tampering.
    now = log.read_text().splitlines()
    rewrite(log, now[:len(lines) + 1] + [now[len(lines) + 1].replace('"after_torn":1,', '')] + now[len(lines) + 2:])
    drun("audit", "verify", log, "--public-key", apub).fails(1, f"line {len(lines) + 1}")


def test_concurrent_writers_from_several_processes_never_interleave(drun, swarm, tmp_path):  # noqa: F811
    akey = tmp_path / "audit.key"
    drun("keygen", "--type", "ed25519", "--out", akey).ok()
    log = tmp_path / "shared.log"
    argv = [os.environ["DRUN_BIN"], "verify", str(swarm.model), "--signature", str(swarm.sig), "--public-key",
            str(swarm.pub), "--audit-log", str(log), "--audit-key", str(akey), "--audit-checkpoint-every", "5"]
    procs = [subprocess.Popen(["bash", "-c", " && ".join([" ".join(f"'{a}'" for a in argv)] * 6)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(4)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    ev = events(log)
    assert sum(1 for e in ev if e["event"] == "bundle.verified") == 24
    assert [e["seq"] for e in ev] == list(range(1, len(ev) + 1))
    r = drun("audit", "verify", log, "--public-key", f"{akey}.pub", "--json").ok()
    rep = json.loads(r.out)
    assert rep["records"] == len(ev) and rep["torn_lines"] == [] and rep["unsealed"] == 0


def test_audit_options_are_checked(drun, swarm, drun_keys, tmp_path):  # noqa: F811
    ec_key, _ = drun_keys["ecdsa-p256"]
    base = ["verify", swarm.model, "--signature", swarm.sig, "--public-key", swarm.pub]
    drun(*base, "--audit-log", tmp_path / "l", "--audit-key", ec_key).fails(2, "ed25519")
    drun(*base, "--audit-key", ec_key).fails(2, "--audit-log")
    drun(*base, "--audit-log", "").fails(2, "--audit-log")
    drun(*base, "--audit-log", tmp_path / "l", "--audit-checkpoint-every", "0").fails(2, "checkpoint")
    drun("keygen", "--type", "ed25519", "--out", tmp_path / "k", "--audit-log", tmp_path / "l").fails(2, "--audit-log")
    warned = drun(*base, "--audit-log", tmp_path / "nokey.log").ok()
    assert "without --audit-key" in warned.err
    drun("audit", "verify", tmp_path / "absent.log", "--public-key", swarm.pub).fails(3)
    drun("audit", "verify", tmp_path / "nokey.log").fails(2, "--public-key")
    drun("audit", "frobnicate").fails(2, "usage")
    drun("audit", "show", tmp_path / "nokey.log", "--since", "yesterday").fails(2, "--since")
    (tmp_path / "dir.log").mkdir()
    drun(*base, "--audit-log", tmp_path / "dir.log").fails((2, 3), "audit log")
