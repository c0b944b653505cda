"""Own redis-server processes for the e2e tests: a single server and a 3-master Redis Cluster.

Every server runs on a free loopback port (never 6379) with `--save '' --appendonly no`, in a
tmp dir, and is stopped by its fixture. A tiny RESP client over raw sockets talks to them
(no redis-py); `redis-cli` is used only for `--cluster create`.
"""

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from helpers import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def _need_redis():
    for b in (REDIS_SERVER, REDIS_CLI):
        if not (os.path.isfile(b) and os.access(b, os.X_OK)):
            pytest.skip("%s not installed (apt-get install redis-server redis-tools)" % b)


# ---------------------------------------------------------------- RESP over a raw socket
class RespError(Exception):
    pass


def _encode(args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if not isinstance(a, bytes):
            a = str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def _read_reply(rf):
    line = rf.readline()
    if not line:
        raise EOFError("redis closed the connection")
    t, rest = line[:1], line[1:-2]
    if t == b"+":
        return rest.decode()
    if t == b"-":
        return RespError(rest.decode())
    if t == b":":
        return int(rest)
    if t == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = rf.read(n + 2)
        return data[:-2]
    if t == b"*":
        n = int(rest)
        if n < 0:
            return None
        return [_read_reply(rf) for _ in range(n)]
    raise RespError("bad RESP reply %r" % line)


def resp(port, *args, timeout=2.0):
    """One command on a fresh connection; returns the decoded reply (raises RespError on -ERR)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(_encode(args))
        with s.makefile("rb") as rf:
            r = _read_reply(rf)
    if isinstance(r, RespError):
        raise r
    return r


def ping(port):
    try:
        return resp(port, "PING", timeout=0.5) == "PONG"
    except (OSError, EOFError, RespError, ValueError):
        return False


def parse_info(text):
    if isinstance(text, bytes):
        text = text.decode()
    out = {}
    for line in text.splitlines():
        if ":" in line and not line.startswith("#"):
            k, v = line.split(":", 1)
            out[k] = v
    return out


def commandstats(port):
    """{command: calls} from INFO commandstats."""
    out = {}
    for k, v in parse_info(resp(port, "INFO", "commandstats")).items():
        if k.startswith("cmdstat_"):
            fields = dict(kv.split("=", 1) for kv in v.split(","))
            out[k[len("cmdstat_"):]] = int(fields["calls"])
    return out


# ---------------------------------------------------------------- processes
class PortTaken(RuntimeError):
    """redis-server could not bind a port found free a moment before."""


class RedisServer:
    """One redis-server on a free port (or a given one, for a restart on the same port)."""

    def __init__(self, workdir, port=None, cluster=False, bus_port=None, extra_args=(), tls=None):
        self.workdir = Path(workdir)
        self.extra_args = list(extra_args)
        # tls: a TlsFiles; the server then also listens with TLS on tls_port (the plain port
        # stays, for the tests' own RESP client).
        self.tls = tls
        self.tls_port = free_port() if tls else None
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Ports found free here may be taken before redis-server binds them (any outgoing
        # connection's ephemeral port can land there): `start` picks again the ones it chose.
        self.chose_ports = port is None and bus_port is None
        self.port = port or free_port()
        self.cluster = cluster
        self.bus_port = bus_port
        self.proc = None
        self.starts = 0

    @property
    def url(self):
        return "redis://127.0.0.1:%d" % self.port

    @property
    def tls_url(self):
        return "rediss://127.0.0.1:%d" % self.tls_port

    def start(self, timeout=10.0):
        for attempt in range(3):
            try:
                return self._start(timeout)
            except PortTaken:
                if not self.chose_ports or attempt == 2:
                    raise
                self.port = free_port()
                self.tls_port = free_port() if self.tls else None
                self.bus_port = None

    def _start(self, timeout):
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
                "--protected-mode", "no", "--daemonize", "no",
                "--logfile", str(self.workdir / ("redis-%d.log" % self.port))]
        if self.cluster:
            if self.bus_port is None:
                self.bus_port = free_port()
            args += ["--cluster-enabled", "yes",
                     "--cluster-config-file", str(self.workdir / ("nodes-%d.conf" % self.port)),
                     "--cluster-port", str(self.bus_port),
                     "--cluster-node-timeout", "5000"]
        if self.tls:
            args += ["--tls-port", str(self.tls_port), "--tls-cert-file", str(self.tls.cert),
                     "--tls-key-file", str(self.tls.key), "--tls-ca-cert-file", str(self.tls.ca),
                     "--tls-auth-clients", "no"]
            if self.cluster:
                args += ["--tls-cluster", "yes"]
        args += self.extra_args
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while not ping(self.port):
            if self.proc.poll() is not None:
                log = self.log_tail()
                kind = PortTaken if "Address already in use" in log else RuntimeError
                raise kind("redis-server on %d exited with %s; log:\n%s"
                           % (self.port, self.proc.returncode, log))
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("redis-server on %d did not answer PING within %.0fs"
                                   % (self.port, timeout))
            time.sleep(0.01)
        return self

    def log_tail(self, n=20):
        try:
            return "\n".join((self.workdir / ("redis-%d.log" % self.port)).read_text().splitlines()[-n:])
        except OSError:
            return "<no log>"

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def cmd(self, *args, timeout=2.0):
        return resp(self.port, *args, timeout=timeout)

    def commandstats(self):
        return commandstats(self.port)

    def keys(self, pattern="ringway:*"):
        return sorted(k.decode() for k in self.cmd("KEYS", pattern))

    def pause(self):
        """SIGSTOP: the port stays open, nothing answers."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self):
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self):
        """SIGKILL: every connection is reset at once, the port is closed."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except OSError:
                pass
            self.proc.kill()
            self.proc.wait(5)

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class RedisCluster:
    """Three cluster-enabled masters (no replicas), created with `redis-cli --cluster create`."""

    def __init__(self, workdir, n=3, extra_args=(), tls=None):
        self.workdir = Path(workdir)
        self.nodes = [RedisServer(self.workdir / ("node%d" % i), cluster=True, extra_args=extra_args,
                                  tls=tls)
                      for i in range(n)]

    @property
    def urls(self):
        return [n.url for n in self.nodes]

    @property
    def tls_urls(self):
        return [n.tls_url for n in self.nodes]

    def start(self, timeout=30.0):
        for n in self.nodes:
            n.start()
        cp = subprocess.run([REDIS_CLI, "--cluster", "create"]
                            + ["127.0.0.1:%d" % n.port for n in self.nodes]
                            + ["--cluster-replicas", "0", "--cluster-yes"],
                            capture_output=True, text=True, timeout=timeout)
        if cp.returncode != 0:
            raise RuntimeError("redis-cli --cluster create failed (%d):\n%s\n%s"
                               % (cp.returncode, cp.stdout, cp.stderr))
        deadline = time.monotonic() + timeout
        while True:
            states = []
            for n in self.nodes:
                try:
                    info = parse_info(n.cmd("CLUSTER", "INFO"))
                    states.append((info.get("cluster_state"), int(info.get("cluster_known_nodes", 0))))
                except (OSError, EOFError, RespError):
                    states.append((None, 0))
            if all(st == "ok" and k == len(self.nodes) for st, k in states):
                return self
            if time.monotonic() > deadline:
                raise RuntimeError("redis cluster not ok within %.0fs: %r" % (timeout, states))
            time.sleep(0.05)

    def commandstats(self):
        total = {}
        for n in self.nodes:
            for k, v in n.commandstats().items():
                total[k] = total.get(k, 0) + v
        return total

    def keys(self, pattern="ringway:*"):
        out = []
        for n in self.nodes:
            out += n.keys(pattern)
        return sorted(out)

    def node_of_key(self, key):
        """The node holding key (from CLUSTER SLOTS of a live node)."""
        live = [n for n in self.nodes if n.alive()]
        slot = live[0].cmd("CLUSTER", "KEYSLOT", key)
        for n in live[:1]:
            for rng in n.cmd("CLUSTER", "SLOTS"):
                lo, hi, master = rng[0], rng[1], rng[2]
                if lo <= slot <= hi:
                    port = master[1]
                    return next(x for x in self.nodes if x.port == port)
        raise AssertionError("no node owns slot %d" % slot)

    def stop(self):
        for n in self.nodes:
            n.stop()


# ---------------------------------------------------------------- TLS
class TlsFiles:
    """A private CA and a server certificate for 127.0.0.1, made with the openssl command."""

    def __init__(self, workdir):
        d = Path(workdir)
        d.mkdir(parents=True, exist_ok=True)
        self.ca, self.cert, self.key = d / "ca.pem", d / "redis.pem", d / "redis.key"

        def ossl(*args):
            subprocess.run(["openssl"] + list(args), cwd=d, check=True, capture_output=True)

        ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=redis test CA")
        (d / "redis.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
                                     "extendedKeyUsage=serverAuth,clientAuth\n"
                                     "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        ossl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", "redis.key", "-out", "redis.csr", "-subj", "/CN=127.0.0.1")
        ossl("x509", "-req", "-in", "redis.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "redis.ext", "-out", "redis.pem")


def _need_tls_redis():
    _need_redis()
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    out = subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True).stdout
    if "build=" not in out:
        pytest.skip("cannot tell whether redis-server was built with TLS")


# ---------------------------------------------------------------- fixtures
@pytest.fixture
def redis_server(tmp_path_factory):
    """A fresh redis-server for one test (stopped afterwards)."""
    _need_redis()
    r = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield r
    r.stop()


@pytest.fixture
def redis_cluster_partial(tmp_path_factory):
    """A 3-master Redis Cluster whose masters keep serving their slots while another is down
    (cluster-require-full-coverage no), for one test."""
    _need_redis()
    c = RedisCluster(tmp_path_factory.mktemp("redisclusterp"),
                     extra_args=["--cluster-require-full-coverage", "no"])
    try:
        c.start()
    except Exception:
        c.stop()
        raise
    yield c
    c.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    """A 3-master Redis Cluster for a module (tests use distinct keys)."""
    _need_redis()
    c = RedisCluster(tmp_path_factory.mktemp("rediscluster"))
    try:
        c.start()
    except Exception:
        c.stop()
        raise
    yield c
    c.stop()


@pytest.fixture
def redis_tls_server(tmp_path_factory):
    """A fresh redis-server that also listens with TLS (`tls_url`, CA in `.tls.ca`)."""
    _need_tls_redis()
    d = tmp_path_factory.mktemp("redistls")
    r = RedisServer(d / "server", tls=TlsFiles(d / "pki")).start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def redis_tls_cluster(tmp_path_factory):
    """A 3-master Redis Cluster speaking TLS on its clients' and bus ports."""
    _need_tls_redis()
    d = tmp_path_factory.mktemp("redistlscluster")
    c = RedisCluster(d / "nodes", tls=TlsFiles(d / "pki"))
    try:
        c.start()
    except Exception:
        c.stop()
        raise
    c.tls = c.nodes[0].tls
    yield c
    c.stop()
