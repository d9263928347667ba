"""Fixtures that run the real `tylserver.py` as a process on loopback."""

import http.client
import os
import re
import signal
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

    @property
    def data_path(self):
        return os.path.join(self.workdir, self.config['FILE_DATA_PATH'])

    @property
    def url(self):
        return 'http://127.0.0.1:%d' % self.port

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
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
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
        return http.client.HTTPConnection('127.0.0.1', self.port, timeout=timeout)

    def request(self, method, path, body=None, headers=None, connection=None):
        """One request; returns (status, headers as a dict, body bytes).

        With `connection`, the request goes over that keep-alive connection.
        """
        own = connection is None
        connection = connection or self.connection()
        try:
            connection.request(method, path, body=body, headers=headers or {})
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
