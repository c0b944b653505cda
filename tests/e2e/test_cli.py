"""The ringway command line: `check`, start-up logging, SIGTERM."""

import re
import signal
import subprocess
import time

import pytest

from conftest import make_config, ringway_bin
from helpers import free_port, wait_until


def _check(conf_path):
    return subprocess.run([ringway_bin(), "check", "--conf", str(conf_path)],
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def need_bin():
    import os
    if not os.access(ringway_bin(), os.X_OK):
        pytest.fail("ringway binary not found at %s (set RINGWAY_BIN)" % ringway_bin(), pytrace=False)


def _valid(port=None):
    return make_config(port or free_port(),
                       upstreams=[{"name": "b", "endpoints": ["127.0.0.1:9"]}],
                       routes=[{"name": "r", "match": {"path_prefix": "/"}, "upstream": "b"}])


def test_check_accepts_valid_config(tmp_path, need_bin):
    """`ringway check` exits 0 on a valid config."""
    p = tmp_path / "ok.toml"
    p.write_text(_valid())
    r = _check(p)
    assert r.returncode == 0, r.stdout + r.stderr


def test_check_reports_file_line_key_for_bad_duration(tmp_path, need_bin):
    """A bad duration is reported as `file:line: key: message` with the right line, exit 1."""
    text = _valid().replace('connect_timeout = "1s"', 'connect_timeout = "soon"')
    lines = text.splitlines()
    lineno = next(i + 1 for i, l in enumerate(lines) if l.startswith("connect_timeout"))
    p = tmp_path / "bad.toml"
    p.write_text(text)
    r = _check(p)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert re.search(r"%s:%d: [^:\n]*connect_timeout[^:\n]*: \S" % (re.escape(str(p)), lineno), out), out


def test_check_reports_route_to_unknown_upstream(tmp_path, need_bin):
    """A route naming an undefined upstream is an error naming the key `upstream`, exit 1."""
    text = _valid().replace('upstream = "b"', 'upstream = "nope"')
    lines = text.splitlines()
    lineno = next(i + 1 for i, l in enumerate(lines) if l.startswith('upstream = "nope"'))
    p = tmp_path / "bad2.toml"
    p.write_text(text)
    r = _check(p)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert re.search(r"%s:%d: [^\n]*upstream" % (re.escape(str(p)), lineno), out), out


def _openssl(cwd, *args):
    subprocess.run(["openssl"] + list(args), cwd=cwd, check=True, capture_output=True)


def test_check_warns_about_a_certificate_expiring_soon_and_fails_on_a_bad_key(tmp_path, need_bin):
    """A listener certificate valid 5 more days is a warning line on stderr (exit 0); a key
    that does not match its certificate is an error naming key, line and file (exit 1)."""
    for name in ("a", "b"):
        _openssl(tmp_path, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-keyout", name + ".key", "-out", name + ".pem", "-days", "5",
                 "-subj", "/CN=%s.test" % name, "-addext", "subjectAltName=DNS:%s.test" % name)
    text = _valid().replace("[[upstreams]]", '[listeners.tls]\ncerts = [ { cert = "a.pem", key = "a.key" } ]\n\n[[upstreams]]', 1)
    p = tmp_path / "tls.toml"
    p.write_text(text)
    r = _check(p)
    assert r.returncode == 0, r.stdout + r.stderr
    lineno = next(i + 1 for i, l in enumerate(text.splitlines()) if l.startswith("certs = "))
    assert re.search(r"^warning: %s:%d: listeners\[0\]\.tls\.certs\[0\]\.cert: .*a\.pem expires on"
                     % (re.escape(str(p)), lineno), r.stderr, re.M), r.stderr

    p.write_text(text.replace('key = "a.key"', 'key = "b.key"'))
    r = _check(p)
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(r"%s:%d: listeners\[0\]\.tls\.certs\[0\]\.key: the key in \S*b\.key does not match"
                     % (re.escape(str(p)), lineno), r.stderr), r.stderr


def test_logs_listening_and_stops_on_sigterm(tmp_path, need_bin):
    """At start ringway logs a `listening` line; SIGTERM stops it promptly with status 0."""
    port = free_port()
    conf = tmp_path / "run.toml"
    conf.write_text(_valid(port))
    log = tmp_path / "run.log"
    with open(log, "wb") as lf:
        proc = subprocess.Popen([ringway_bin(), "--conf", str(conf)], stdout=lf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        try:
            wait_until(lambda: proc.poll() is not None or b"listening" in log.read_bytes(), 15,
                       what="a 'listening' log line")
            assert proc.poll() is None, log.read_text()
            assert str(port) in log.read_text(), log.read_text()
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(10)
            assert rc == 0, "exit status %s after SIGTERM; log:\n%s" % (rc, log.read_text())
            assert time.monotonic() - t0 < 5
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
