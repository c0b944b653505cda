"""nginx as an HTTPS origin for Ringway's upstream TLS tests: TLS in front of the Python backend
(so chunked, Content-Length and event-stream bodies come through unchanged), a large sparse file
served straight from disk, an access log that names each TLS connection (so a test can count the
origin's handshakes), and optionally a required client certificate (mTLS)."""

import os
import shutil
import subprocess

from helpers import free_port, port_open, wait_until

CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
{user}
events {{ worker_connections 4096; }}
http {{
    log_format tls '$connection $ssl_protocol $ssl_session_reused $status $request_uri';
    access_log {dir}/access.log tls;
    client_body_temp_path {dir}/tmp_body;
    proxy_temp_path {dir}/tmp_proxy;
    fastcgi_temp_path {dir}/tmp_fcgi;
    uwsgi_temp_path {dir}/tmp_uwsgi;
    scgi_temp_path {dir}/tmp_scgi;
    keepalive_requests 100000;
    keepalive_timeout 60s;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        {client_auth}
        location = /big {{
            alias {dir}/big.bin;
            default_type application/octet-stream;
        }}
        location / {{
            proxy_pass http://{backend};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""


def nginx_binary():
    for path in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if path and os.path.exists(path):
            return path
    raise RuntimeError("nginx not found (scripts/setup.sh installs it)")


class NginxTls:
    """One nginx process serving HTTPS on a free loopback port."""

    def __init__(self, directory, cert, key, backend_addr, client_ca=None, big_bytes=0):
        self.dir = str(directory)
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        if big_bytes:
            with open(os.path.join(self.dir, "big.bin"), "wb") as f:
                f.truncate(big_bytes)
        client_auth = ""
        if client_ca:
            client_auth = "ssl_client_certificate %s;\n        ssl_verify_client on;" % client_ca
        conf = CONF.format(dir=self.dir, port=self.port, cert=cert, key=key, backend=backend_addr,
                           client_auth=client_auth,
                           user="user root;" if os.geteuid() == 0 else "")
        self.conf_path = os.path.join(self.dir, "nginx.conf")
        with open(self.conf_path, "w") as f:
            f.write(conf)
        self.proc = None

    @property
    def addr(self):
        return "127.0.0.1:%d" % self.port

    def start(self):
        self.proc = subprocess.Popen([nginx_binary(), "-c", self.conf_path, "-p", self.dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(lambda: port_open(self.port) or self.proc.poll() is not None, 10,
                   what="nginx TLS origin listening")
        if self.proc.poll() is not None:
            raise RuntimeError("nginx exited: %s" % self.proc.stderr.read().decode(errors="replace"))
        return self

    def log_lines(self):
        """(connection id, protocol, reused, status, uri) per request logged so far."""
        try:
            with open(os.path.join(self.dir, "access.log")) as f:
                return [tuple(line.split()) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def connections(self):
        """Distinct TLS connections that carried a request (each began with a handshake)."""
        return {line[0] for line in self.log_lines()}

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
