"""Fixtures for Ringway's end-to-end tests: backends, configs, the ringway process."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))

from ai_upstream import AiUpstreamProc  # noqa: E402
from helpers import free_port, port_open, stop_process  # noqa: E402

WORKERS = 2
BUFFER_SIZE = 16 * 1024
BUFFERS_PER_WORKER = 256

_LIVE = []  # running Ringway instances, for crash checks and failure logs


def ringway_bin():
    return os.environ.get("RINGWAY_BIN", str(REPO / "target" / "release" / "ringway"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: 1 GiB transfers (skipped when RINGWAY_SKIP_SLOW=1)")


def pytest_sessionstart(session):
    binary = ringway_bin()
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        pytest.exit("ringway binary not found or not executable at %s "
                    "(build with `cargo build --release` or set RINGWAY_BIN)" % binary, returncode=3)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("RINGWAY_SKIP_SLOW") == "1":
        skip = pytest.mark.skip(reason="RINGWAY_SKIP_SLOW=1")
        for it in items:
            if "slow" in it.keywords:
                it.add_marker(skip)


# ---------------------------------------------------------------- memory probes
def proc_status(pid):
    """VmRSS and VmHWM of pid in bytes, from /proc/PID/status."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) * 1024
    return out


def rss(pid):
    return proc_status(pid)["VmRSS"]


def hwm(pid):
    return proc_status(pid)["VmHWM"]


# ---------------------------------------------------------------- config writer
def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return '"%s"' % v.replace("\\", "\\\\").replace('"', '\\"')
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join("%s = %s" % (_toml_key(k), _toml_value(x)) for k, x in v.items()) + " }"
    raise TypeError(v)


def _toml_key(k):
    if all(c.isalnum() or c in "_-" for c in k):
        return k
    return _toml_value(k)


def make_config(port, upstreams, routes, server=None, listeners=None, admin=None, log=None):
    """Build a Ringway TOML config. upstreams/routes: lists of dicts.

    admin: an admin port (int) or "host:port"; log: a dict for the [log] table."""
    srv = {
        "workers": WORKERS,
        "pin_cores": False,
        "buffer_size": "16KiB",
        "buffers_per_worker": BUFFERS_PER_WORKER,
        "max_body_bytes": "2GiB",
        "header_timeout": "2s",
    }
    srv.update(server or {})
    out = ["[server]"]
    out += ["%s = %s" % (k, _toml_value(v)) for k, v in srv.items()]
    if admin is not None:
        addr = admin if isinstance(admin, str) else "127.0.0.1:%d" % admin
        out += ["", "[admin]", "listen = %s" % _toml_value(addr)]
    if log:
        out += ["", "[log]"]
        out += ["%s = %s" % (k, _toml_value(v)) for k, v in log.items()]
    for lst in listeners or [{"name": "public", "address": "127.0.0.1:%d" % port}]:
        out.append("")
        out.append("[[listeners]]")
        out += ["%s = %s" % (k, _toml_value(v)) for k, v in lst.items()]
    for u in upstreams:
        d = {"connect_timeout": "1s", "response_timeout": "2s", "max_connections": 64, "max_idle": 16}
        d.update(u)
        out.append("")
        out.append("[[upstreams]]")
        out += ["%s = %s" % (k, _toml_value(v)) for k, v in d.items()]
    for r in routes:
        out.append("")
        out.append("[[routes]]")
        out += ["%s = %s" % (k, _toml_value(v)) for k, v in r.items()]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- processes
class BackendProc:
    """backend.py in its own process (own GIL), on a free port."""

    def __init__(self, name, port=0, delay_ms=0):
        self.name = name
        args = [sys.executable, str(HERE / "backend.py"), "--name", name]
        if port:
            args += ["--port", str(port)]
        if delay_ms:
            args += ["--delay-ms", str(delay_ms)]
        self.proc = subprocess.Popen(args,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError("backend %s did not start: %r" % (name, line))
        self.port = int(line.split()[1])
        deadline = time.monotonic() + 10
        while not port_open(self.port):
            if time.monotonic() > deadline:
                raise RuntimeError("backend %s not accepting on %d" % (name, self.port))
            time.sleep(0.02)

    @property
    def addr(self):
        return "127.0.0.1:%d" % self.port

    def kill(self):
        """SIGKILL: the listener and every connection vanish at once."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)

    def stop(self):
        stop_process(self.proc)


def _server_line(config_text, key, value):
    """`config_text` with `key = value` in its [server] table, unless it sets the key itself."""
    if re.search(r"^\s*%s\s*=" % key, config_text, re.M):
        return config_text
    line = "%s = %s" % (key, _toml_value(value))
    if re.search(r"^\[server\]\s*$", config_text, re.M):
        return re.sub(r"^\[server\]\s*$", "[server]\n" + line, config_text, count=1, flags=re.M)
    return "[server]\n%s\n\n%s" % (line, config_text)


def with_test_driver(config_text):
    """RINGWAY_TEST_DRIVER=epoll (or io_uring) puts every Ringway a test starts on that driver,
    and RINGWAY_TEST_BUFFER_RING=off on the readiness receive path (`buffer_ring = false`),
    unless its config sets that itself."""
    driver = os.environ.get("RINGWAY_TEST_DRIVER")
    if driver:
        config_text = _server_line(config_text, "driver", driver)
    if os.environ.get("RINGWAY_TEST_BUFFER_RING") == "off":
        config_text = _server_line(config_text, "buffer_ring", False)
    return config_text


def expected_receive_path(driver=None, buffer_ring=None):
    """The receive path /stats should report for a Ringway started with these settings (None:
    what the test run's environment gives): "buffer_ring" on io_uring on Linux 5.19 and later
    unless turned off, else "readiness"."""
    driver = driver or os.environ.get("RINGWAY_TEST_DRIVER") or "io_uring"
    if buffer_ring is None:
        buffer_ring = os.environ.get("RINGWAY_TEST_BUFFER_RING") != "off"
    nums = re.match(r"(\d+)\.(\d+)", os.uname().release)
    kernel = (int(nums.group(1)), int(nums.group(2))) if nums else (0, 0)
    if driver != "epoll" and buffer_ring and kernel >= (5, 19):
        return "buffer_ring"
    return "readiness"


class Ringway:
    def __init__(self, config_text, workdir, name="ringway", port=None, env=None):
        """env: variables added to this process's environment for ringway (provider keys)."""
        self.env = env
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf = self.workdir / ("%s.toml" % name)
        self.conf.write_text(with_test_driver(config_text))
        self.log_path = self.workdir / ("%s.stderr.log" % name)
        self.port = port
        self.proc = None
        self.stopped = False

    def start(self, timeout=15.0):
        binary = ringway_bin()
        if not os.path.isfile(binary) or not os.access(binary, os.X_OK):
            pytest.fail("ringway binary not found or not executable at %s "
                        "(build with `cargo build --release` or set RINGWAY_BIN)" % binary,
                        pytrace=False)
        self._log = open(self.log_path, "wb")
        env = dict(os.environ, **self.env) if self.env else None
        self.proc = subprocess.Popen([binary, "--conf", str(self.conf)],
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env)
        _LIVE.append(self)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError("ringway exited with %s during start-up; config:\n%s\nlog:\n%s"
                                     % (self.proc.returncode, self.conf.read_text(), self.log_tail()))
            if port_open(self.port):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError("ringway did not listen on %d within %.0fs; log:\n%s"
                                     % (self.port, timeout, self.log_tail()))
            time.sleep(0.02)

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def rss(self):
        return rss(self.pid)

    def hwm(self):
        return hwm(self.pid)

    def log_tail(self, n=60):
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "<no log>"
        return "\n".join(lines[-n:])

    def stop(self):
        """SIGTERM, then SIGKILL after 5 s. Returns the exit code."""
        if self.proc is None or self.stopped:
            return None
        self.stopped = True
        if self in _LIVE:
            _LIVE.remove(self)
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


class RingwayFactory:
    """Starts ringway instances from (upstreams, routes, server) and stops them all."""

    def __init__(self, tmpdir):
        self.tmpdir = Path(tmpdir)
        self.instances = []

    def start(self, upstreams, routes, server=None, name=None, admin=None, log=None):
        port = free_port()
        name = name or "ringway%d" % len(self.instances)
        text = make_config(port, upstreams, routes, server, admin=admin, log=log)
        rw = Ringway(text, self.tmpdir / name, name=name, port=port)
        self.instances.append(rw)
        return rw.start()

    def stop_all(self):
        crashed = []
        for rw in self.instances:
            if rw.proc is not None and not rw.stopped and rw.proc.poll() is not None:
                crashed.append("%s exited with %s before SIGTERM; log:\n%s"
                               % (rw.conf.name, rw.proc.returncode, rw.log_tail()))
            rw.stop()
        self.instances = []
        return crashed


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def backend():
    b = BackendProc("b1")
    yield b
    b.stop()


@pytest.fixture(scope="session")
def backend2():
    b = BackendProc("b2")
    yield b
    b.stop()


@pytest.fixture(scope="module")
def ai_up():
    """An OpenAI-style origin (ai_upstream.py) in its own process."""
    u = AiUpstreamProc("openai")
    yield u
    u.stop()


@pytest.fixture(scope="module")
def ai_up_b():
    """An Anthropic-style origin, the second provider of the AI tests."""
    u = AiUpstreamProc("anthropic")
    yield u
    u.stop()


@pytest.fixture(scope="module")
def ringway_factory(tmp_path_factory):
    f = RingwayFactory(tmp_path_factory.mktemp("ringway"))
    yield f
    crashed = f.stop_all()
    assert not crashed, "\n".join(crashed)


@pytest.fixture
def ringway_fn(tmp_path):
    """Function-scoped factory: instances stop when the test ends."""
    f = RingwayFactory(tmp_path)
    yield f
    crashed = f.stop_all()
    assert not crashed, "\n".join(crashed)


@pytest.fixture(autouse=True)
def _ringway_still_alive(request):
    """After every test, fail it if a ringway it used crashed (with the log tail)."""
    yield
    dead = [rw for rw in list(_LIVE) if rw.proc is not None and rw.proc.poll() is not None]
    for rw in dead:
        _LIVE.remove(rw)
    if dead:
        pytest.fail("ringway died during this test (exit %s); log:\n%s"
                    % (dead[0].proc.returncode, dead[0].log_tail()), pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" and rep.failed:
        for rw in list(_LIVE):
            rep.sections.append(("ringway log (%s)" % rw.conf.name, rw.log_tail(30)))
