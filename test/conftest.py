"""Fixtures that run the real `tylserver.py` as a process on loopback."""

import http.client
import os
import re
import signal
import ssl
import subprocess
import sys
import time

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TYLSERVER = os.path.join(ROOT, 'tylserver.py')
LISTENING = re.compile(r'listening on https?://\[?([0-9a-fA-F:.]+)\]?:(\d+)/')


class TYLProcess(object):
    """One `python3 tylserver.py --config DIR/config.yaml` process.

    Its config lives in `workdir`, its data in `workdir/data`, its log in
    `workdir/server.log`.  A restart keeps the port, as a real restart would.
    """

    def __init__(self, workdir, **config):
        self.workdir = str(workdir)
        # Extra environment variables for the process (e.g. NOTIFY_SOCKET).
        self.env = {}
        self.config = {
            'BACKEND_SERVICE_IP': '127.0.0.1',
            'BACKEND_SERVICE_PORT': 0,
            'FILE_DATA_PATH': 'data',
            'LOG_LEVEL': 'INFO',
        }
        self.config.update(config)
        self.config_path = os.path.join(self.workdir, 'config.yaml')
        self.log_path = os.path.join(self.workdir, 'server.log')
        self.process = None
        self.port = None
        # For a server with USE_SSL and AUTH_USERS: the client's TLS context
        # (trusting the test CA) and headers sent with every request.
        self.client_context = None
        self.default_headers = {}

    @property
    def data_path(self):
        return os.path.join(self.workdir, self.config['FILE_DATA_PATH'])

    @property
    def url(self):
        return '%s://127.0.0.1:%d' % ('https' if self.config.get('USE_SSL') else 'http', self.port)

    def start(self, timeout=15):
        config = dict(self.config)
        if self.port:
            config['BACKEND_SERVICE_PORT'] = self.port
        with open(self.config_path, 'w') as stream:
            yaml.safe_dump(config, stream)
        log_offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        with open(self.log_path, 'ab') as log:
            self.process = subprocess.Popen(
                [sys.executable, TYLSERVER, '--config', self.config_path],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=dict(os.environ, **self.env) if self.env else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = LISTENING.search(self.log()[log_offset:])
            if found:
                self.port = int(found.group(2))
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        self.kill()
        raise RuntimeError('tylserver did not start:\n' + self.log()[log_offset:])

    def stop(self, timeout=15):
        """SIGTERM, and wait for a clean exit; returns the exit code."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout)
        return self.process.returncode if self.process else None

    def kill(self):
        """SIGKILL: the process gets no chance to tidy up."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(15)

    def restart(self):
        self.stop()
        return self.start()

    def log(self):
        if not os.path.exists(self.log_path):
            return ''
        with open(self.log_path, encoding='utf-8', errors='replace') as stream:
            return stream.read()

    def connection(self, timeout=30):
        if self.client_context:
            return http.client.HTTPSConnection('127.0.0.1', self.port, timeout=timeout,
                                               context=self.client_context)
        return http.client.HTTPConnection('127.0.0.1', self.port, timeout=timeout)

    def request(self, method, path, body=None, headers=None, connection=None):
        """One request; returns (status, headers as a dict, body bytes).

        With `connection`, the request goes over that keep-alive connection.
        """
        own = connection is None
        connection = connection or self.connection()
        try:
            headers = dict(self.default_headers, **(headers or {}))
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            if own:
                connection.close()


@pytest.fixture
def tyl_factory(tmp_path):
    """Make (not start) servers with extra config; all are stopped at the end."""
    made = []

    def make(name='server', **config):
        workdir = tmp_path / name
        workdir.mkdir()
        server = TYLProcess(workdir, **config)
        made.append(server)
        return server

    yield make
    for server in made:
        server.kill()


@pytest.fixture
def tyl_server(tyl_factory):
    """A started server on the default file backend."""
    return tyl_factory().start()


class Certificates(object):
    """PEM files made at run time in `directory`: a test CA, a server
    certificate for 127.0.0.1 and localhost, client certificates whose
    subject CN is `alice` and `bob`, and one for `alice` from a CA the
    server does not trust.  Each `name` has `name.pem` and `name.key`."""

    def __init__(self, directory):
        self.directory = str(directory)
        ca = self.issue('ca', 'TYL test CA', None)
        self.issue('server', '127.0.0.1', ca, server=True)
        self.issue('alice', 'alice', ca)
        self.issue('bob', 'bob', ca)
        self.issue('stranger', 'alice', self.issue('other-ca', 'Another CA', None))

    def pem(self, name):
        return os.path.join(self.directory, name + '.pem')

    def key(self, name):
        return os.path.join(self.directory, name + '.key')

    def issue(self, name, common_name, issuer, server=False):
        """Write `name`.pem and .key; `issuer` is (certificate, key), None for a CA."""
        import datetime
        import ipaddress
        x509 = pytest.importorskip('cryptography.x509')
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        issuer_certificate, issuer_key = issuer or (None, key)
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder()
                   .subject_name(subject)
                   .issuer_name(issuer_certificate.subject if issuer else subject)
                   .public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None),
                                  critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                  critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       issuer_key.public_key()), critical=False))
        if issuer is None:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False), critical=True)
        else:
            usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address('127.0.0.1')), x509.DNSName('localhost')]),
                critical=False)
        certificate = builder.sign(issuer_key, hashes.SHA256())
        with open(self.pem(name), 'wb') as stream:
            stream.write(certificate.public_bytes(serialization.Encoding.PEM))
        with open(self.key(name), 'wb') as stream:
            stream.write(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        return certificate, key

    def client_context(self, name=None):
        """A client TLS context trusting the test CA, presenting `name`'s certificate."""
        context = ssl.create_default_context(cafile=self.pem('ca'))
        if name:
            context.load_cert_chain(self.pem(name), self.key(name))
        return context

    def server_config(self, **config):
        """Config keys for a TLS server with the test server certificate."""
        return dict(USE_SSL=True, SSL_PUBLIC_KEY=self.pem('server'),
                    SSL_PRIVATE_KEY=self.key('server'), **config)


@pytest.fixture(scope='session')
def certificates(tmp_path_factory):
    return Certificates(tmp_path_factory.mktemp('certificates'))
