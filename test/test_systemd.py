"""Running under systemd: the `systemd-unit` command, the notify protocol
(READY, WATCHDOG, STOPPING, RELOADING), SIGHUP reloading users and rules
and reopening LOG_FILE, and a SIGTERM that lets a slow request finish."""

import base64
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

import tylserver
from conftest import ROOT, TYLSERVER

pytestmark = pytest.mark.skipif(not hasattr(socket, 'AF_UNIX') or not hasattr(signal, 'SIGHUP'),
                                reason='needs AF_UNIX sockets and POSIX signals')


def systemd_unit(tmp_path, config, *options):
    path = tmp_path / 'config.yaml'
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, TYLSERVER, '--config', str(path), 'systemd-unit']
                            + list(options), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return path, result.stdout.splitlines()


def directive(lines, name):
    found = [line.split('=', 1)[1] for line in lines if line.startswith(name + '=')]
    assert len(found) == 1, (name, lines)
    return found[0]


def test_systemd_unit_names_this_installation_with_absolute_paths(tmp_path):
    config, lines = systemd_unit(tmp_path, {'FILE_DATA_PATH': 'states',
                                            'AUDIT_LOG': 'logs/audit.jsonl',
                                            'LOG_FILE': 'log/tyl.log'})
    assert directive(lines, 'ExecStart').split() == [
        os.path.abspath(sys.executable), os.path.abspath(TYLSERVER), '--config', str(config)]
    assert directive(lines, 'Type') == 'notify'
    assert directive(lines, 'User') == 'tyl' and directive(lines, 'Group') == 'tyl'
    assert directive(lines, 'ProtectSystem') == 'strict'
    assert directive(lines, 'ReadWritePaths').split() == [
        str(tmp_path / 'states'), str(tmp_path / 'logs'), str(tmp_path / 'log')]
    assert directive(lines, 'NoNewPrivileges') == 'true'
    assert directive(lines, 'PrivateTmp') == 'true'
    assert directive(lines, 'ProtectHome') in ('true', 'read-only')
    assert directive(lines, 'RestrictAddressFamilies') == 'AF_INET AF_INET6 AF_UNIX'
    assert directive(lines, 'Restart') == 'on-failure'
    assert directive(lines, 'ExecReload') == '/bin/kill -HUP $MAINPID'
    assert directive(lines, 'WatchdogSec')
    assert '[Service]' in lines and '[Install]' in lines
    if str(tmp_path).startswith(('/tmp/', '/var/tmp/')):    # pytest's usual base
        warning = [line for line in lines if line.startswith('# WARNING: PrivateTmp=true hides')]
        assert len(warning) == 1 and str(tmp_path / 'states') in warning[0], lines


def test_systemd_unit_warns_on_stderr_of_paths_the_service_cannot_see(tmp_path):
    path = tmp_path / 'config.yaml'
    path.write_text(yaml.safe_dump({'FILE_DATA_PATH': '/tmp/tyl-states'}))
    result = subprocess.run([sys.executable, TYLSERVER, '--config', str(path), 'systemd-unit'],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=30)
    assert result.returncode == 0
    assert 'tylserver: WARNING: PrivateTmp=true hides these from the service; install and keep ' \
           'the data elsewhere: ' in result.stderr and '/tmp/tyl-states' in result.stderr


def test_systemd_unit_user_option_and_sqlite_directory(tmp_path):
    _, lines = systemd_unit(tmp_path, {'BACKEND_CLASS': 'sqlite_backend.SQLiteBackend',
                                       'SQLITE_DB_PATH': 'db/tyl.sqlite3'}, '--user', 'terraform')
    assert directive(lines, 'User') == 'terraform' and directive(lines, 'Group') == 'terraform'
    assert directive(lines, 'ReadWritePaths') == str(tmp_path / 'db')


def test_systemd_unit_without_a_config_file_names_the_missing_file(tmp_path):
    # An installed TYL has no config.yaml beside tylserver.py: a unit without
    # --config would resolve its data paths from systemd's working directory.
    for name in ('tylserver.py', 'tylstore.py'):
        shutil.copy(os.path.join(ROOT, name), str(tmp_path))
    shutil.copytree(os.path.join(ROOT, 'backends'), str(tmp_path / 'backends'))
    result = subprocess.run([sys.executable, str(tmp_path / 'tylserver.py'), 'systemd-unit'],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=30, cwd=str(tmp_path))
    assert result.returncode == 2 and not result.stdout
    assert result.stderr.strip().splitlines() == [
        'tylserver: error: systemd-unit needs the config file the service will read: there is none at '
        '%s; pass --config PATH' % (tmp_path / 'config.yaml')]


class NotifySocket(object):
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages = []

    def wait_for(self, message, timeout=10):
        """Wait for a datagram holding the line `message`; return all seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                data = self.sock.recv(4096).decode('utf-8')
            except socket.timeout:
                break
            self.messages.append(data)
            if message in data.split('\n'):
                return self.messages
        raise AssertionError('no %s in %r' % (message, self.messages))

    def close(self):
        self.sock.close()


@pytest.fixture
def notify(tmp_path):
    # AF_UNIX paths are short (108 bytes); tmp_path can be longer.
    path = tmp_path / 'notify'
    if len(str(path)) > 100:
        pytest.skip('tmp_path too long for an AF_UNIX socket')
    sock = NotifySocket(path)
    yield sock
    sock.close()


def test_notify_ready_watchdog_and_stopping(tyl_factory, notify):
    server = tyl_factory()
    server.env = {'NOTIFY_SOCKET': notify.path, 'WATCHDOG_USEC': '200000'}
    server.start()
    notify.wait_for('READY=1')
    for _ in range(3):
        notify.wait_for('WATCHDOG=1', timeout=2)
    server.process.send_signal(signal.SIGTERM)
    notify.wait_for('STOPPING=1')
    assert server.process.wait(10) == 0


def basic(user, password):
    return {'Authorization': 'Basic ' + base64.b64encode(
        ('%s:%s' % (user, password)).encode()).decode()}


def write_config(server, **changes):
    config = dict(server.config, BACKEND_SERVICE_PORT=server.port, **changes)
    with open(server.config_path, 'w') as stream:
        yaml.safe_dump(config, stream)


def test_sighup_reloads_users_and_a_broken_config_keeps_them(tyl_factory, notify):
    server = tyl_factory(AUTH_USERS={'alice': tylserver.hash_password('old password')},
                         AUTH_ADMINS=['alice'])
    server.env = {'NOTIFY_SOCKET': notify.path}
    server.start()
    notify.wait_for('READY=1')
    assert server.request('GET', '/?env=dev', headers=basic('alice', 'old password'))[0] == 204
    write_config(server, AUTH_USERS={'alice': tylserver.hash_password('new password'),
                                     'bob': tylserver.hash_password('bob password')},
                 AUTH_ADMINS=['alice'], MAX_CONNECTIONS=7)
    server.process.send_signal(signal.SIGHUP)
    notify.wait_for('RELOADING=1')
    notify.wait_for('READY=1')
    assert server.request('GET', '/?env=dev', headers=basic('alice', 'new password'))[0] == 204
    assert server.request('GET', '/?env=dev', headers=basic('bob', 'bob password'))[0] == 403
    assert server.request('GET', '/?env=dev', headers=basic('alice', 'old password'))[0] == 401
    ignored = [line for line in server.log().splitlines() if 'needing a restart' in line]
    assert len(ignored) == 1 and 'MAX_CONNECTIONS' in ignored[0]
    time.sleep(1.1)                     # the wait after one failed login

    write_config(server, AUTH_USERS={'alice': 'not a hash'}, AUTH_ADMINS=['alice'])
    server.process.send_signal(signal.SIGHUP)
    notify.wait_for('RELOADING=1')
    notify.wait_for('READY=1')
    assert server.request('GET', '/?env=dev', headers=basic('alice', 'new password'))[0] == 204
    failed = [line for line in server.log().splitlines() if 'reload failed' in line]
    assert len(failed) == 1 and 'AUTH_USERS' in failed[0]
    assert server.process.poll() is None
    assert server.stop() == 0


def test_sigterm_lets_a_slow_write_finish_and_exits_within_10_s(tyl_factory, notify):
    server = tyl_factory()
    server.env = {'NOTIFY_SOCKET': notify.path}
    server.start()
    notify.wait_for('READY=1')
    state = json.dumps({'version': 4, 'serial': 1, 'lineage': 'slow',
                        'padding': 'x' * (4 * 1024 * 1024)}).encode()
    half = len(state) // 2
    connection = server.connection()
    connection.putrequest('POST', '/?env=slow')
    connection.putheader('Content-Type', 'application/json')
    connection.putheader('Content-Length', str(len(state)))
    connection.endheaders()
    connection.send(state[:half])
    # The handler thread must have parsed the headers before SIGTERM, or the
    # request is not yet under way; on a loaded machine that can take a while.
    time.sleep(2)
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    notify.wait_for('STOPPING=1')
    time.sleep(0.5)                     # stopped accepting, still waiting for the body
    connection.send(state[half:])
    response = connection.getresponse()
    response.read()
    connection.close()
    assert response.status == 200
    assert server.process.wait(10) == 0
    assert time.monotonic() - started < 10
    server.start()
    status, _, body = server.request('GET', '/?env=slow')
    assert status == 200 and json.loads(body.decode())['lineage'] == 'slow'
    assert server.request('LOCK', '/?env=slow', body=json.dumps({'ID': 'x'}))[0] == 200


def test_log_file_is_0600_and_sighup_reopens_it_after_logrotate(tyl_factory, notify):
    server = tyl_factory(LOG_FILE='tyl.log')
    server.env = {'NOTIFY_SOCKET': notify.path}
    server.start()
    notify.wait_for('READY=1')
    log_file = pathlib.Path(server.workdir, 'tyl.log')
    rotated = log_file.with_name('tyl.log.1')
    assert server.request('GET', '/?env=before')[0] == 204
    log_file.rename(rotated)            # what logrotate does
    server.process.send_signal(signal.SIGHUP)
    notify.wait_for('RELOADING=1')
    notify.wait_for('READY=1')
    assert server.request('GET', '/?env=after')[0] == 204
    deadline = time.monotonic() + 10    # the access line follows the answer
    while 'env=after' not in log_file.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 'env=after' in log_file.read_text()
    assert log_file.stat().st_mode & 0o777 == 0o600
    assert 'env=before' in rotated.read_text() and 'env=after' not in rotated.read_text()
    assert 'env=before' not in server.log()  # standard error keeps only the start-up line
    assert server.stop() == 0
