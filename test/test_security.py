"""Authentication, access rules, TLS and hostile clients, through the real server process.

The servers here run with the issue's example rules:
prod-* is administered by @ops (alice), written by ci and read by bob;
every other environment is written by alice, bob, ci and émile; root (in
@admins, named by AUTH_ADMINS) may do everything everywhere; dave may do
nothing at all.
"""

import base64
import http.client
import json
import logging
import os
import pty
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
import types

import pytest
import yaml

import tylserver
from conftest import TYLSERVER
from test_http import (BAD_ENV_NAMES, EMPTY_MD5, STATE, RawConnection, lock_info, raw_request,
                       terraform_headers)

PASSWORDS = {
    'alice': 'alice-secret',
    'bob': 'bob-secret',
    'ci': 'ci:secret:with:colons',
    'dave': 'dave-secret',
    'root': 'root-secret',
    '\u00e9mile': 'p\u00e4ssw\u00f6rd: \u00fc \u2603',
}
RULES = [
    {'env': 'prod-*', 'admin': ['@ops'], 'write': ['ci'], 'read': ['bob']},
    {'env': '*', 'write': ['alice', 'bob', 'ci', '\u00e9mile']},
]
ALLOWED_RESPONSE_HEADERS = {'server', 'date', 'content-type', 'content-length', 'connection',
                            'www-authenticate', 'allow', 'retry-after', 'content-md5'}


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

@pytest.fixture(scope='module')
def hashes():
    return {user: tylserver.hash_password(password) for user, password in PASSWORDS.items()}


def auth_config(hashes, **config):
    settings = dict(AUTH_USERS=hashes, AUTH_GROUPS={'ops': ['alice'], 'admins': ['root']},
                    AUTH_RULES=RULES, AUTH_ADMINS=['@admins'])
    settings.update(config)
    return settings


@pytest.fixture
def secured(tyl_factory, hashes):
    """A started server with the rules above; its requests default to root."""
    server = tyl_factory(**auth_config(hashes)).start()
    server.default_headers = credentials('root')
    return server


def basic(user, password):
    token = base64.b64encode(('%s:%s' % (user, password)).encode('utf-8')).decode('ascii')
    return 'Basic ' + token


def credentials(user, password=None):
    return {'Authorization': basic(user, PASSWORDS[user] if password is None else password)}


def as_user(server, user, method, path, body=None, headers=None, password=None):
    """One request as `user` (None: no credentials); (status, headers, body)."""
    sent = dict(headers or {})
    sent['Authorization'] = basic(user, PASSWORDS[user] if password is None else password) \
        if user else None
    connection = server.connection()
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in sent.items():
            if value is not None:
                connection.putheader(name, value)
        connection.putheader('Content-Length', str(len(body or b'')))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def status_as(server, user, method, path, body=None):
    headers = terraform_headers(body) if body is not None else {}
    return as_user(server, user, method, path, body, headers)[0]


def run_tylserver(*args, stdin=None, config=None, tmp_path=None):
    command = [sys.executable, TYLSERVER]
    if config is not None:
        path = tmp_path / 'config.yaml'
        path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding='utf-8')
        command += ['--config', str(path)]
    environ = {k: v for k, v in os.environ.items() if not k.startswith('TYL_')}
    return subprocess.run(command + list(args), input=stdin, capture_output=True, env=environ,
                          timeout=60)


def files_under(path):
    found = set()
    for directory, directories, files in os.walk(str(path)):
        for name in directories + files:
            found.add(os.path.relpath(os.path.join(directory, name), str(path)))
    return found


def thread_count(server):
    with open('/proc/%d/status' % server.process.pid) as stream:
        return int([line.split()[1] for line in stream if line.startswith('Threads:')][0])


# --------------------------------------------------------------------------
# hash-password and the configuration
# --------------------------------------------------------------------------

def test_hash_password_reads_one_line_from_a_pipe():
    password = 'p\u00e4ss:w\u00f6rd:with colons '
    result = run_tylserver('hash-password', stdin=(password + '\n').encode('utf-8'))
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode().strip()
    assert text.startswith('scrypt$16384$8$1$') and password not in text
    parsed = tylserver.PasswordHash.parse(text)
    assert parsed.matches(password.encode('utf-8'))
    assert not parsed.matches(password.strip().encode('utf-8'))
    # A second hash of the same password has its own salt.
    again = run_tylserver('hash-password', stdin=(password + '\r\n').encode('utf-8'))
    assert again.stdout.decode().strip() != text
    assert tylserver.PasswordHash.parse(again.stdout.decode().strip()).matches(password.encode('utf-8'))


@pytest.mark.parametrize('stdin, message', [(b'\n', 'empty'), (b'', 'empty'), (b'\xff\xfe\n', 'UTF-8')])
def test_hash_password_refuses_an_empty_or_undecodable_password(stdin, message):
    result = run_tylserver('hash-password', stdin=stdin)
    assert result.returncode == 2 and message in result.stderr.decode()
    assert result.stdout == b''


def test_hash_password_on_a_terminal_asks_twice_without_echo():
    pid, terminal = pty.fork()
    if pid == 0:    # the child, on the new terminal
        try:
            os.execv(sys.executable, [sys.executable, TYLSERVER, 'hash-password'])
        finally:
            os._exit(127)
    output = b''

    def read_until(wanted, timeout=30):
        nonlocal output
        deadline = time.monotonic() + timeout
        while wanted not in output and time.monotonic() < deadline:
            ready, _, _ = select.select([terminal], [], [], 0.2)
            if ready:
                try:
                    piece = os.read(terminal, 4096)
                except OSError:     # the child closed the terminal
                    break
                if not piece:
                    break
                output += piece
        return wanted in output

    try:
        assert read_until(b'Password: '), output
        os.write(terminal, b'typed secret\n')
        assert read_until(b'Password again: '), output
        os.write(terminal, b'typed secret\n')
        assert read_until(b'scrypt$'), output
        read_until(b'\n', timeout=5)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(terminal)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, output
    assert b'typed secret' not in output
    line = output[output.index(b'scrypt$'):].split(b'\r\n')[0].decode()
    assert tylserver.PasswordHash.parse(line).matches(b'typed secret')


def test_a_plain_text_password_is_refused_at_start_up(tmp_path):
    result = run_tylserver(config={'AUTH_USERS': {'alice': 'correct horse battery'}}, tmp_path=tmp_path)
    stderr = result.stderr.decode()
    assert result.returncode == 2
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert 'AUTH_USERS' in stderr and 'hash-password' in stderr
    assert 'horse' not in stderr


@pytest.mark.parametrize('config, key', [
    ({'AUTH_USERS': ['alice']}, 'AUTH_USERS'),
    ({'AUTH_USERS': {'al:ice': 'x'}}, 'AUTH_USERS'),
    ({'AUTH_USERS': {'alice': 'scrypt$16384$8$1$c2FsdHNhbHQ=$'}}, 'AUTH_USERS'),
    ({'AUTH_USERS': {'alice': 'scrypt$1000$8$1$c2FsdHNhbHRzYWx0$' + 'A' * 44}}, 'AUTH_USERS'),
    ({'AUTH_USERS': {'alice': 'pbkdf2_sha256$0$c2FsdHNhbHRzYWx0$' + 'A' * 44}}, 'AUTH_USERS'),
    ({'AUTH_GROUPS': {'ops': ['@nested']}}, 'AUTH_GROUPS'),
    ({'AUTH_GROUPS': {'ops': ['nobody']}}, 'AUTH_GROUPS'),
    ({'AUTH_RULES': [{'env': '*', 'wirte': ['alice']}]}, 'AUTH_RULES'),
    ({'AUTH_RULES': [{'read': ['alice']}]}, 'AUTH_RULES'),
    ({'AUTH_RULES': {'env': '*'}}, 'AUTH_RULES'),
    ({'AUTH_RULES': [{'env': '*', 'admin': ['@nogroup']}]}, 'AUTH_RULES'),
    ({'AUTH_RULES': [{'env': '*', 'read': ['nobody']}]}, 'AUTH_RULES'),
    ({'AUTH_ADMINS': ['nobody']}, 'AUTH_ADMINS'),
    ({'SSL_CLIENT_CA': 'ca.pem'}, 'SSL_CLIENT_CA'),
    ({'SSL_CLIENT_CERT_USERS': True}, 'SSL_CLIENT_CERT_USERS'),
    ({'SSL_CLIENT_CERT_USERS': 'yes'}, 'SSL_CLIENT_CERT_USERS'),
])
def test_a_bad_access_setting_stops_start_up_with_one_line(tmp_path, hashes, config, key):
    settings = {'AUTH_USERS': {'alice': hashes['alice']}}
    settings.update(config)
    result = run_tylserver('--check-config', config=settings, tmp_path=tmp_path)
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert len(stderr.strip().splitlines()) == 1 and key in stderr, stderr


def test_the_issue_example_and_pbkdf2_hashes_check_out(tmp_path, hashes):
    pbkdf2 = tylserver.PasswordHash('pbkdf2_sha256', (1000,), os.urandom(16), bytes(32))
    pbkdf2 = str(pbkdf2._replace(digest=pbkdf2.derive(b'pw')))
    config = auth_config(hashes)
    config['AUTH_USERS'] = dict(hashes, legacy=pbkdf2)
    result = run_tylserver('--check-config', config=config, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert tylserver.PasswordHash.parse(pbkdf2).matches(b'pw')


def test_every_action_has_a_permission():
    actions = {action for methods in tylserver.TYLRequestHandler.ROUTES.values()
               for action in methods.values()}
    handler = tylserver.TYLRequestHandler
    kinds = [set(handler.PERMISSIONS), set(handler.OPEN_ACTIONS), set(handler.USER_ACTIONS)]
    assert actions == set.union(*kinds)
    assert sum(map(len, kinds)) == len(actions)     # each in one kind only
    assert set(tylserver.TYLRequestHandler.PERMISSIONS.values()) <= set(tylserver.ACCESS_LEVELS)


def exposure_warnings(caplog, host, required, ssl_context=None):
    server = types.SimpleNamespace(server_address=(host, 2442), ssl_context=ssl_context,
                                   access=types.SimpleNamespace(required=required))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='tyl'):
        tylserver._warn_if_exposed(server)
    return [record.getMessage() for record in caplog.records]


def test_a_server_reachable_from_elsewhere_warns_at_start_up(caplog):
    assert exposure_warnings(caplog, '127.0.0.1', False) == []
    assert exposure_warnings(caplog, '::1', False) == []
    for host in ('0.0.0.0', '::', '192.0.2.10'):
        (warning,) = exposure_warnings(caplog, host, False)
        assert 'without AUTH_USERS' in warning and host in warning
        (warning,) = exposure_warnings(caplog, host, True)
        assert 'without USE_SSL' in warning
        assert exposure_warnings(caplog, host, True, ssl_context=object()) == []


# --------------------------------------------------------------------------
# authentication
# --------------------------------------------------------------------------

REQUESTS = [
    ('GET', '/?env=dev', None),
    ('POST', '/?env=dev', STATE),
    ('PUT', '/?env=dev', STATE),
    ('DELETE', '/?env=dev', None),
    ('LOCK', '/lock?env=dev', lock_info('L1')),
    ('POST', '/lock?env=dev', lock_info('L1')),
    ('UNLOCK', '/unlock?env=dev', lock_info('L1')),
    ('UNLOCK', '/unlock?env=dev', b''),
    ('DELETE', '/lock?env=dev', b''),
    ('GET', '/state', None),
    ('GET', '/nowhere', None),
]


def test_without_credentials_everything_is_401_with_a_basic_challenge(secured):
    for method, path, body in REQUESTS:
        status, headers, data = as_user(secured, None, method, path, body)
        assert status == 401, (method, path, status)
        assert headers['WWW-Authenticate'].startswith('Basic realm="TYL"')
        assert data == b'authentication required\n'
    assert not os.path.exists(secured.data_path) or os.listdir(secured.data_path) == []
    status, _, data = as_user(secured, 'root', 'GET', '/state')
    assert status == 200 and json.loads(data)['environments'] == []


def test_health_is_open_and_names_nothing(secured):
    for user in (None, 'bob'):
        assert as_user(secured, user, 'GET', '/health')[::2] == (200, b'ok\n')
    assert as_user(secured, None, 'POST', '/health', b'{}')[0] == 401
    assert not os.path.exists(secured.data_path) or os.listdir(secured.data_path) == []


def test_an_unknown_user_and_a_wrong_password_get_the_same_401_at_the_same_cost(secured):
    def attempt(user, password):
        started = time.monotonic()
        status, headers, data = as_user(secured, user, 'GET', '/?env=dev', password=password)
        return time.monotonic() - started, (status, headers.get('WWW-Authenticate'), data)

    # Each (user, address) fails once only: a second failure would wait (429).
    wrong = [attempt(user, 'not-the-password') for user in ('alice', 'bob', 'ci', 'dave')]
    unknown = [attempt(user, 'not-the-password') for user in ('zoe', 'yann', 'xavier', 'walt')]
    answers = {answer for _, answer in wrong + unknown}
    assert answers == {(401, 'Basic realm="TYL", charset="UTF-8"', b'wrong user name or password\n')}
    wrong_time = sorted(seconds for seconds, _ in wrong)[1]
    unknown_time = sorted(seconds for seconds, _ in unknown)[1]
    # A check against the hash costs tens of milliseconds; a remembered success far less.
    right = sorted(attempt(user, PASSWORDS[user])[0] for user in ('root', 'root', 'root', 'root'))[1]
    print('\nmedian-ish ms: wrong password %.1f, unknown user %.1f, known right password %.1f'
          % (wrong_time * 1000, unknown_time * 1000, right * 1000))
    assert unknown_time > 0.5 * wrong_time
    assert wrong_time > 0.5 * unknown_time


def test_passwords_with_colons_and_non_ascii_characters(secured):
    assert status_as(secured, 'ci', 'POST', '/?env=dev', STATE) == 200
    assert status_as(secured, '\u00e9mile', 'GET', '/?env=dev') == 200
    token = base64.b64encode('root:root-secret'.encode()).decode()
    assert secured.request('GET', '/?env=dev', headers={'Authorization': 'basic  ' + token})[0] == 200
    # The same password, Latin-1 instead of UTF-8, is a different password.
    latin1 = base64.b64encode(('\u00e9mile:' + PASSWORDS['\u00e9mile']).encode('latin-1', 'replace'))
    status, _, _ = secured.request('GET', '/?env=dev',
                                   headers={'Authorization': 'Basic ' + latin1.decode()})
    assert status == 401


@pytest.mark.parametrize('label, authorization', [
    ('no-colon', 'Basic ' + base64.b64encode(b'root').decode()),
    ('empty-password', 'Basic ' + base64.b64encode(b'root:').decode()),
    ('empty-user', 'Basic ' + base64.b64encode(b':root-secret').decode()),
    ('bad-base64', 'Basic !!!!root:root-secret'),
    ('truncated-base64', 'Basic ' + base64.b64encode(b'root:root-secret').decode()[:-3]),
    ('plain-text', 'Basic root:root-secret'),
    ('scheme-only', 'Basic'),
    ('bearer', 'Bearer ' + base64.b64encode(b'root:root-secret').decode()),
    ('upper-case-user', 'Basic ' + base64.b64encode(b'ROOT:root-secret').decode()),
    ('trailing-space-user', 'Basic ' + base64.b64encode(b'root :root-secret').decode()),
    ('nul-in-user', 'Basic ' + base64.b64encode(b'root\x00:root-secret').decode()),
    ('not-utf-8', 'Basic ' + base64.b64encode(b'root:\xffroot-secret').decode()),
])
def test_malformed_or_wrong_credentials_are_401(secured, label, authorization):
    for method, path, body in REQUESTS:
        status, _, _ = secured.request(method, path, body, headers={'Authorization': authorization})
        assert status in (401, 429), (label, method, path, status)
    assert not os.path.exists(secured.data_path) or os.listdir(secured.data_path) == []


def test_two_authorization_headers_are_401_even_when_one_is_right(secured):
    with RawConnection(secured) as raw:
        status, _, data = raw.exchange(raw_request('GET', '/state', headers=[
            ('Authorization', basic('root', PASSWORDS['root'])),
            ('Authorization', basic('dave', PASSWORDS['dave']))]))
    assert status == 401 and b'more than one' in data


def test_a_refused_request_is_answered_before_its_body(secured):
    """At once, for a 10 GB body: 401 for a stranger, 403 for a user in no
    rule, 400 for /health, which is open to all and takes no body, 413 for
    root."""
    for user, method, path, expected in ((None, 'POST', '/?env=dev', 401),
                                         ('dave', 'POST', '/?env=dev', 403),
                                         ('dave', 'LOCK', '/lock?env=dev', 403),
                                         (None, 'GET', '/health', 400),
                                         ('root', 'POST', '/?env=dev', 413)):
        headers = [('Content-Length', '10000000000')]
        if user:
            headers.append(('Authorization', basic(user, PASSWORDS[user])))
        with RawConnection(secured, timeout=5) as raw:
            started = time.monotonic()
            status, response_headers, _ = raw.exchange(
                raw_request(method, path, headers=headers, length=False), method)
            elapsed = time.monotonic() - started
        assert status == expected and elapsed < 2, (user, path, status, elapsed)
        assert response_headers.get('Connection', '').lower() == 'close'
    # A 401 to a request without a body keeps the connection.
    with RawConnection(secured) as raw:
        assert raw.exchange(raw_request('GET', '/?env=dev', length=False))[0] == 401
        assert raw.exchange(raw_request('GET', '/?env=dev', length=False, headers=[
            ('Authorization', basic('root', PASSWORDS['root']))]))[0] == 204


def test_failed_logins_are_logged_with_address_and_escaped_user_never_the_password(secured):
    forged = 'eve\nFORGED 127.0.0.1 "GET /state" status=200'
    assert as_user(secured, 'alice', 'GET', '/?env=dev', password='guess-one')[0] == 401
    status, _, _ = secured.request('GET', '/?env=dev', headers={
        'Authorization': 'Basic ' + base64.b64encode((forged + ':guess-two').encode()).decode()})
    assert status == 401
    time.sleep(0.2)
    log = secured.log()
    assert '127.0.0.1 login failed for user "alice" (1 in a row from this address)' in log
    assert 'login failed for user "eve\\nFORGED' in log
    assert 'guess-one' not in log and 'guess-two' not in log
    assert not any(line.startswith('FORGED') for line in log.splitlines())
    assert 'user=root' not in log    # root never asked
    assert as_user(secured, 'root', 'GET', '/?env=dev')[0] == 204
    time.sleep(0.2)
    assert 'user=root' in secured.log()


def test_failed_logins_wait_per_user_and_address(secured):
    assert as_user(secured, 'alice', 'GET', '/?env=dev', password='wrong')[0] == 401
    # The same pair, even with the right password, must wait; told how long.
    status, headers, data = as_user(secured, 'alice', 'GET', '/?env=dev')
    assert status == 429 and headers['Retry-After'] == '1', data
    # Another user from the same address is not slowed.
    assert as_user(secured, 'bob', 'GET', '/?env=dev')[0] == 204
    time.sleep(1.1)
    assert as_user(secured, 'alice', 'GET', '/?env=dev')[0] == 204
    # A success forgets the failures: the next one waits 1 s again, then 2 s.
    assert as_user(secured, 'alice', 'GET', '/?env=dev', password='wrong')[0] == 401
    time.sleep(1.1)
    assert as_user(secured, 'alice', 'GET', '/?env=dev', password='wrong')[0] == 401
    assert as_user(secured, 'alice', 'GET', '/?env=dev')[1]['Retry-After'] == '2'


def test_guesses_sent_in_parallel_are_checked_one_at_a_time(secured):
    count = 20
    barrier = threading.Barrier(count, timeout=30)
    statuses = []

    def guess(number):
        connection = secured.connection()
        try:
            connection.connect()
            barrier.wait()
            connection.request('GET', '/?env=dev', headers=credentials('alice', 'guess-%d' % number))
            statuses.append(connection.getresponse().status)
        finally:
            connection.close()

    threads = [threading.Thread(target=guess, args=(number,)) for number in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(statuses) == [401] + [429] * (count - 1)


def test_failed_logins_never_lock_out_another_address_and_memory_is_bounded(monkeypatch):
    monkeypatch.setattr(tylserver.FailedLogins, 'MAX_PAIRS', 50)
    failures = tylserver.FailedLogins()
    for number in range(1, 10):
        assert failures.record(('alice', '192.0.2.1')) == number
    assert 59 < failures.wait(('alice', '192.0.2.1')) <= 60      # capped
    assert failures.wait(('alice', '198.51.100.7')) == 0          # the owner, elsewhere
    assert failures.wait(('bob', '192.0.2.1')) == 0
    for number in range(200):
        failures.record(('user%d' % number, '192.0.2.2'))
    assert len(failures._pairs) == 50
    assert failures.wait(('alice', '192.0.2.1')) == 0             # the oldest went first


# --------------------------------------------------------------------------
# access rules
# --------------------------------------------------------------------------

def test_permissions_follow_the_first_matching_rule(secured):
    lock = lock_info('L-rules')
    # bob may only read prod-*.
    assert status_as(secured, 'root', 'POST', '/?env=prod-app', STATE) == 200
    assert status_as(secured, 'bob', 'GET', '/?env=prod-app') == 200
    for method, path, body in [
            ('POST', '/?env=prod-app', STATE), ('PUT', '/?env=prod-app', STATE),
            ('LOCK', '/lock?env=prod-app', lock), ('POST', '/lock?env=prod-app', lock),
            ('UNLOCK', '/unlock?env=prod-app', lock), ('DELETE', '/?env=prod-app', None)]:
        assert status_as(secured, 'bob', method, path, body) == 403, (method, path)
    # ci writes prod-*, but may neither force-unlock nor delete.
    assert status_as(secured, 'ci', 'LOCK', '/lock?env=prod-app', lock) == 200
    assert status_as(secured, 'ci', 'POST', '/?env=prod-app&ID=L-rules', STATE) == 200
    for method, path in [('UNLOCK', '/unlock'), ('DELETE', '/unlock'), ('DELETE', '/lock'),
                         ('UNLOCK', '/')]:
        assert status_as(secured, 'ci', method, path + '?env=prod-app', b'') == 403, (method, path)
        assert status_as(secured, 'ci', method, path + '?env=prod-app', b'  \n') == 403, (method, path)
    assert status_as(secured, 'ci', 'DELETE', '/?env=prod-app&ID=L-rules') == 403
    assert status_as(secured, 'ci', 'UNLOCK', '/unlock?env=prod-app', lock) == 200
    # alice (@ops) administers prod-*: force-unlock and delete.
    assert status_as(secured, 'ci', 'LOCK', '/lock?env=prod-app', lock) == 200
    assert status_as(secured, 'alice', 'UNLOCK', '/unlock?env=prod-app', b'') == 200
    assert status_as(secured, 'alice', 'DELETE', '/?env=prod-app') == 200
    # Names differing only in case fall under the same rule.
    assert status_as(secured, 'bob', 'POST', '/?env=PROD-app', STATE) == 403
    assert status_as(secured, 'bob', 'POST', '/?env=Prod-App', STATE) == 403
    # The catch-all rule: alice, bob and ci write, nobody but root administers.
    for user in ('alice', 'bob', 'ci'):
        assert status_as(secured, user, 'LOCK', '/lock?env=dev', lock) == 200
        assert status_as(secured, user, 'POST', '/?env=dev&ID=L-rules', STATE) == 200
        assert status_as(secured, user, 'UNLOCK', '/unlock?env=dev', lock) == 200
        assert status_as(secured, user, 'UNLOCK', '/unlock?env=dev', b'') == 403
        assert status_as(secured, user, 'DELETE', '/?env=dev') == 403
    # dave is in no rule; root is everywhere.
    assert status_as(secured, 'dave', 'GET', '/?env=dev') == 403
    assert status_as(secured, 'dave', 'GET', '/?env=prod-app') == 403
    assert status_as(secured, 'root', 'UNLOCK', '/unlock?env=dev', b'') == 200
    assert status_as(secured, 'root', 'DELETE', '/?env=dev') == 200
    status, _, data = as_user(secured, 'dave', 'GET', '/?env=dev')
    assert data == b'user dave has no read access to env dev\n'


def test_the_status_page_needs_admin_somewhere_and_shows_only_readable_environments(secured):
    for env in ('prod-a', 'prod-b', 'dev', 'test'):
        assert status_as(secured, 'root', 'POST', '/?env=' + env, STATE) == 200

    def listed(user):
        status, _, data = as_user(secured, user, 'GET', '/state')
        if status != 200:
            return status, None
        return status, sorted(e['environment_name'] for e in json.loads(data)['environments'])

    assert listed('root') == (200, ['dev', 'prod-a', 'prod-b', 'test'])
    assert listed('alice') == (200, ['dev', 'prod-a', 'prod-b', 'test'])
    for user in ('bob', 'ci', 'dave', '\u00e9mile'):
        assert listed(user) == (403, None), user
    # Naming an environment asks for admin on that one.
    assert as_user(secured, 'alice', 'GET', '/state?env=prod-a')[0] == 200
    assert as_user(secured, 'alice', 'GET', '/state?env=dev')[0] == 403


@pytest.mark.parametrize('method, path', [
    ('get', '/?env=prod-app'), ('lock', '/lock?env=prod-app'), ('Post', '/?env=prod-app'),
    ('LOCK', '/lock?env=dev&env=prod-app'), ('LOCK', '/lock?env=prod-app&env=dev'),
    ('POST', '/?env=dev;env=prod-app'), ('POST', '/?env=prod-app%00'), ('POST', '/?env=%2e%2e'),
    ('POST', '/?env=dev/../prod-app'), ('POST', '/?env=dev%2F..%2Fprod-app'),
    ('POST', '/%2e%2e/?env=prod-app'), ('POST', '/./?env=prod-app'), ('POST', '//?env=prod-app'),
    ('GET', '/state/'), ('GET', '/%73tate'), ('GET', '/state?env=prod-app&env=dev'),
])
def test_bypass_attempts_are_refused(secured, method, path):
    """bob may read prod-app and write dev; none of these may write prod-app or see /state."""
    before = as_user(secured, 'root', 'GET', '/?env=prod-app')[2]
    body = lock_info('L-bypass') if 'lock' in path else STATE
    status, _, _ = as_user(secured, 'bob', method, path, body, terraform_headers(body))
    assert status in (400, 403, 404, 405), status
    assert as_user(secured, 'root', 'GET', '/?env=prod-app')[2] == before
    status, _, data = as_user(secured, 'root', 'GET', '/state')
    assert [e['environment_name'] for e in json.loads(data)['environments']] in ([], ['prod-app'])
    assert files_under(secured.data_path) <= {'prod-app', os.path.join('prod-app', 'lock.json')}


# --------------------------------------------------------------------------
# names that try to leave the data directory or to inject headers
# --------------------------------------------------------------------------

MORE_BAD_NAMES = ['..%2F..%2Fetc%2Fpasswd', '%2e%2e%2f%2e%2e', '....%2F%2F', '%252e%252e', 'a%5cb',
                  '..%5c..', '%c0%ae%c0%ae', '%2Ftmp%2Fx', '~root', 'app%0d%0aSet-Cookie:%20x=1',
                  'app%0d%0a%0d%0aHTTP/1.1%20200%20OK', 'app%20HTTP/1.1', '%e2%80%a8', 'a%09b']


@pytest.mark.parametrize('name', [n for _, n in BAD_ENV_NAMES if n] + MORE_BAD_NAMES)
def test_a_traversal_or_injection_name_is_refused_and_creates_nothing(secured, tmp_path, name):
    before = files_under(tmp_path)
    attempts = [('GET', '/?env='), ('POST', '/?env='), ('PUT', '/?env='), ('DELETE', '/?env='),
                ('LOCK', '/lock?env='), ('UNLOCK', '/unlock?env='), ('POST', '/?env=dev&ID=')]
    for method, prefix in attempts:
        body = lock_info('L1') if 'lock' in prefix else STATE
        status, headers, data = as_user(secured, 'root', method, prefix + name, body,
                                        terraform_headers(body))
        if prefix.endswith('ID='):   # the ID is not a name: it only fails to match
            assert status == 409, (method, name, status)
        else:
            assert status == 400, (method, name, status, data)
        assert b'\n' not in data.rstrip(b'\n')
        assert {header.lower() for header in headers} <= ALLOWED_RESPONSE_HEADERS, headers
    assert files_under(tmp_path) - before == set()
    assert not os.path.exists(secured.data_path) or os.listdir(secured.data_path) == []


def test_no_request_text_reaches_a_response_header(secured):
    injected = '%0d%0aSet-Cookie:%20a=b%0d%0aX-Injected:%201'
    paths = ['/?env=dev' + injected, '/?env=dev&ID=x' + injected, '/nowhere' + injected,
             '/state?x=' + injected, '/lock?env=dev' + injected]
    for user in (None, 'root', 'dave'):
        for method in ('GET', 'POST', 'LOCK', 'UNLOCK', 'FOO'):
            for path in paths:
                body = lock_info('x\r\nSet-Cookie: a=b')
                _, headers, _ = as_user(secured, user, method, path, body, terraform_headers(body))
                assert {header.lower() for header in headers} <= ALLOWED_RESPONSE_HEADERS, headers


# --------------------------------------------------------------------------
# TLS and client certificates
# --------------------------------------------------------------------------

def tls_request(server, context, method, path, body=None, headers=None):
    connection = http.client.HTTPSConnection('127.0.0.1', server.port, timeout=10, context=context)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_https_with_basic_authentication(tyl_factory, hashes, certificates):
    server = tyl_factory(**certificates.server_config(**auth_config(hashes))).start()
    assert server.url.startswith('https://127.0.0.1:')
    context = certificates.client_context()
    assert tls_request(server, context, 'GET', '/?env=dev')[0] == 401
    assert tls_request(server, context, 'POST', '/?env=dev', STATE, credentials('alice'))[0] == 200
    assert tls_request(server, context, 'GET', '/?env=dev', None, credentials('bob'))[2] == STATE
    # Plain HTTP to the TLS port gets no state.
    with pytest.raises((http.client.HTTPException, OSError)):
        response = http.client.HTTPConnection('127.0.0.1', server.port, timeout=5)
        response.request('GET', '/?env=dev', headers=credentials('bob'))
        assert response.getresponse().status != 200


def test_client_certificates_are_required_and_verified(tyl_factory, hashes, certificates):
    config = certificates.server_config(SSL_CLIENT_CA=certificates.pem('ca'), **auth_config(hashes))
    server = tyl_factory(**config).start()
    for name in (None, 'stranger'):     # none, or one from a CA the server does not trust
        with pytest.raises((ssl.SSLError, OSError, http.client.HTTPException)):
            status = tls_request(server, certificates.client_context(name), 'GET', '/?env=dev',
                                 None, credentials('root'))[0]
            pytest.fail('a client with certificate %s got %d' % (name, status))
    # A trusted certificate opens the connection; the password still decides.
    context = certificates.client_context('bob')
    assert tls_request(server, context, 'GET', '/?env=dev')[0] == 401
    assert tls_request(server, context, 'GET', '/?env=dev', None, credentials('bob'))[0] == 204
    assert server.process.poll() is None


def test_certificate_common_name_is_the_user(tyl_factory, hashes, certificates):
    config = certificates.server_config(SSL_CLIENT_CA=certificates.pem('ca'), SSL_CLIENT_CERT_USERS=True,
                                        **auth_config(hashes))
    server = tyl_factory(**config).start()
    alice, bob = certificates.client_context('alice'), certificates.client_context('bob')
    lock = lock_info('L-cert')
    assert tls_request(server, alice, 'LOCK', '/lock?env=prod-x', lock)[0] == 200
    assert tls_request(server, bob, 'LOCK', '/lock?env=prod-x', lock)[0] == 403
    assert tls_request(server, bob, 'GET', '/?env=prod-x')[0] == 204
    assert tls_request(server, alice, 'UNLOCK', '/unlock?env=prod-x', b'')[0] == 200  # admin via @ops
    assert tls_request(server, alice, 'GET', '/state')[0] == 200
    assert tls_request(server, bob, 'GET', '/state')[0] == 403
    # Basic credentials, when sent, speak instead of the certificate.
    assert tls_request(server, bob, 'GET', '/state', None, credentials('root'))[0] == 200
    assert tls_request(server, alice, 'GET', '/state', None, credentials('root', 'wrong'))[0] == 401
    time.sleep(0.2)
    assert 'user=alice' in server.log() and 'user=bob' in server.log()


# --------------------------------------------------------------------------
# hostile clients
# --------------------------------------------------------------------------

def open_stalled(server, count, data):
    """`count` sockets that each send `data` and then nothing."""
    stalled = []
    try:
        for _ in range(count):
            sock = socket.create_connection(('127.0.0.1', server.port), timeout=10)
            stalled.append(sock)
            if data:
                sock.sendall(data)
    except BaseException:
        close_all(stalled)
        raise
    return stalled


def close_all(sockets):
    for sock in sockets:
        sock.close()


def test_300_stalled_sockets_do_not_starve_a_normal_client(tyl_factory, hashes):
    server = tyl_factory(**auth_config(hashes)).start()
    server.default_headers = credentials('alice')
    assert server.request('POST', '/?env=dev', STATE)[0] == 200
    threads_before = thread_count(server)
    stalled = open_stalled(server, 300, b'GET /?env=dev HT')
    try:
        started = time.monotonic()
        status, _, data = server.request('GET', '/?env=dev')
        elapsed = time.monotonic() - started
        print('\nnormal client behind 300 stalled sockets: %.3f s' % elapsed)
        assert (status, data) == (200, STATE)
        assert elapsed < 2, elapsed
        # A second normal client on a fresh connection, and a LOCK cycle.
        lock = lock_info('L-stalled')
        assert server.request('LOCK', '/lock?env=dev', lock)[0] == 200
        assert server.request('UNLOCK', '/unlock?env=dev', lock)[0] == 200
        assert thread_count(server) <= threads_before + 200
    finally:
        close_all(stalled)
    assert server.process.poll() is None


def test_stalled_tls_handshakes_do_not_starve_a_normal_client(tyl_factory, hashes, certificates):
    server = tyl_factory(MAX_CONNECTIONS=10, **certificates.server_config(**auth_config(hashes))).start()
    context = certificates.client_context()
    stalled = open_stalled(server, 30, b'')     # connect, never say hello
    try:
        started = time.monotonic()
        status, _, _ = tls_request(server, context, 'GET', '/?env=dev', None, credentials('bob'))
        assert status == 204 and time.monotonic() - started < 2
    finally:
        close_all(stalled)


def test_connections_answering_a_request_are_never_closed_and_excess_gets_503(tyl_factory):
    server = tyl_factory(MAX_CONNECTIONS=3).start()
    body = b'{"version": 4, "serial": 1, "pad": "' + b'x' * 60 + b'"}'
    busy = []
    try:
        for number in range(3):     # headers sent, body half sent: each is answering a request
            sock = socket.create_connection(('127.0.0.1', server.port), timeout=10)
            busy.append(sock)
            sock.sendall(raw_request('POST', '/?env=busy-%d' % number, body=body)[:-40])
        time.sleep(0.3)
        started = time.monotonic()
        with RawConnection(server, timeout=5) as raw:
            status, headers, _ = raw.exchange(raw_request('GET', '/?env=other', length=False))
        assert status == 503 and headers['Retry-After'] == '1'
        assert time.monotonic() - started < 1
        for sock in busy:
            sock.sendall(body[-40:])
            response = http.client.HTTPResponse(sock, method='POST')
            response.begin()
            assert response.status == 200
    finally:
        close_all(busy)


def test_header_limits_are_431_or_414_and_close_the_connection(secured):
    too_many = ''.join('X-%d: y\r\n' % number for number in range(101))
    cases = [
        (b'GET /?env=dev HTTP/1.1\r\n' + too_many.encode() + b'\r\n', 431),
        (b'GET /?env=dev HTTP/1.1\r\nX-Long: ' + b'y' * 70000 + b'\r\n\r\n', 431),
        (b'GET /?env=' + b'a' * 70000 + b' HTTP/1.1\r\n\r\n', 414),
    ]
    for request, expected in cases:
        with RawConnection(secured, timeout=5) as raw:
            status, headers, _ = raw.exchange(request)
            assert status == expected
            assert headers.get('Connection', '').lower() == 'close'
            try:
                assert raw.sock.recv(10) == b''
            except ConnectionResetError:    # closed with the rest of the request unread
                pass
    assert as_user(secured, 'root', 'GET', '/?env=dev')[0] == 204


def test_a_lying_content_length_or_bad_chunking_is_400_and_closes_when_authenticated(secured):
    authorization = ('Authorization', basic('root', PASSWORDS['root']))
    cases = [
        ([('Content-Length', '50')], STATE[:20]),
        ([('Transfer-Encoding', 'chunked')], b'zz\r\n{}\r\n0\r\n\r\n'),
        ([('Transfer-Encoding', 'chunked')], b'2\r\n{}XX0\r\n\r\n'),
    ]
    for framing, body in cases:
        with RawConnection(secured, timeout=10) as raw:
            raw.send(raw_request('POST', '/?env=dev', headers=framing + [authorization],
                                 length=False) + body)
            raw.sock.shutdown(socket.SHUT_WR)
            status, headers, _ = raw.response('POST')
        assert status == 400 and headers.get('Connection', '').lower() == 'close', (framing, status)
    assert as_user(secured, 'root', 'GET', '/?env=dev')[0] == 204


def test_force_unlock_sent_as_terraform_sends_it_needs_admin(secured):
    lock = lock_info('L-force')
    assert status_as(secured, 'ci', 'LOCK', '/lock?env=prod-app', lock) == 200
    force_unlock = ('UNLOCK /unlock?env=prod-app HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: %s\r\n'
                    'Transfer-Encoding: chunked\r\nContent-Md5: %s\r\nContent-Type: application/json\r\n'
                    '\r\n0\r\n\r\n')
    with RawConnection(secured) as raw:
        request = force_unlock % (basic('ci', PASSWORDS['ci']), EMPTY_MD5)
        assert raw.exchange(request.encode(), 'UNLOCK')[0] == 403
        request = force_unlock % (basic('alice', PASSWORDS['alice']), EMPTY_MD5)
        assert raw.exchange(request.encode(), 'UNLOCK')[0] == 200
    assert status_as(secured, 'bob', 'LOCK', '/lock?env=dev', lock) == 200


def test_a_flood_of_password_checks_neither_queues_nor_slows_a_known_login(hashes):
    # Every check slot taken, as a flood of guesses with fresh user names
    # would: a login verified before still passes at once, and a new one is
    # answered 503 after a second instead of waiting its turn.
    constants = tylserver.load_config(None, {'TYL_AUTH_USERS': json.dumps(
        {'bob': hashes['bob'], 'dave': hashes['dave']})})
    access = tylserver.Access(constants)
    assert access.authenticate([basic('bob', PASSWORDS['bob'])], None, '10.0.0.1') == 'bob'
    for _ in range(tylserver.CHECKS_AT_ONCE):
        assert access.checking.acquire(timeout=1)
    try:
        assert access.authenticate([basic('bob', PASSWORDS['bob'])], None, '10.0.0.2') == 'bob'
        for user in ('dave', 'nobody-%s' % os.getpid()):
            with pytest.raises(tylserver.Refusal) as refused:
                access.authenticate([basic(user, 'x')], None, '10.0.0.3')
            assert refused.value.status == 503
            assert ('Retry-After', '1') in refused.value.headers
    finally:
        for _ in range(tylserver.CHECKS_AT_ONCE):
            access.checking.release()
    assert access.authenticate([basic('dave', PASSWORDS['dave'])], None, '10.0.0.3') == 'dave'
