"""Throwaway certificates made at test time with the `openssl` command: a CA, leaves signed by
it (server or client, any subjectAltNames, any validity window, expired ones too), and a second
CA nobody trusts. Nothing here is committed key material."""

import os
import subprocess

CA_CNF = """\
[ ca ]
default_ca = ca_default
[ ca_default ]
dir = .
database = index.txt
new_certs_dir = newcerts
serial = serial
default_md = sha256
policy = policy_any
unique_subject = no
copy_extensions = none
[ policy_any ]
commonName = supplied
organizationName = optional
"""


def _openssl(cwd, *args):
    out = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError("openssl %s: %s" % (" ".join(args), out.stderr.strip()))
    return out.stdout


class Pki:
    """A CA in `directory` (EC P-256): `ca.pem`, `ca.key`; leaves go next to it."""

    def __init__(self, directory, name="ca", cn="Ringway Test CA"):
        self.dir = str(directory)
        self.name = name
        os.makedirs(os.path.join(self.dir, "newcerts-%s" % name), exist_ok=True)
        self._db = "index-%s.txt" % name
        open(os.path.join(self.dir, self._db), "w").close()
        with open(os.path.join(self.dir, "serial-%s" % name), "w") as f:
            f.write("1000\n")
        with open(os.path.join(self.dir, "%s.cnf" % name), "w") as f:
            f.write(CA_CNF.replace("index.txt", self._db)
                    .replace("newcerts", "newcerts-%s" % name)
                    .replace("serial = serial", "serial = serial-%s" % name))
        _openssl(self.dir, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-keyout", "%s.key" % name, "-out", "%s.pem" % name, "-days", "30",
                 "-subj", "/CN=%s" % cn)

    @property
    def ca(self):
        """Path of the CA certificate."""
        return os.path.join(self.dir, "%s.pem" % self.name)

    def path(self, file):
        return os.path.join(self.dir, file)

    def leaf(self, name, sans=(), cn=None, days=30, start=None, end=None, client=False):
        """Signs `name.pem` / `name.key`. `sans` like ["DNS:a.test", "IP:127.0.0.1"]; `start` and
        `end` as YYYYMMDDHHMMSSZ replace `days` (an expired leaf: both in the past)."""
        cn = cn or (sans[0].split(":", 1)[1] if sans else name)
        ext = ["basicConstraints=CA:FALSE", "keyUsage=digitalSignature",
               "extendedKeyUsage=%s" % ("clientAuth" if client else "serverAuth")]
        if sans:
            ext.append("subjectAltName=" + ",".join(sans))
        with open(self.path("%s.ext" % name), "w") as f:
            f.write("\n".join(ext) + "\n")
        _openssl(self.dir, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-keyout", "%s.key" % name, "-out", "%s.csr" % name,
                 "-subj", "/CN=%s/O=Ringway Tests" % cn)
        validity = ["-startdate", start, "-enddate", end] if start else ["-days", str(days)]
        _openssl(self.dir, "ca", "-batch", "-notext", "-config", "%s.cnf" % self.name,
                 "-cert", "%s.pem" % self.name, "-keyfile", "%s.key" % self.name,
                 "-in", "%s.csr" % name, "-out", "%s.pem" % name, "-extfile", "%s.ext" % name,
                 *validity)
        return self.path("%s.pem" % name), self.path("%s.key" % name)
