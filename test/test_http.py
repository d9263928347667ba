"""The HTTP protocol of the real server process, over loopback.

Every test talks to a real `tylserver.py` (see conftest.py) through
http.client or a raw socket, and checks what reaches the wire and the disk.
"""

import base64
import hashlib
import http.client
import json
import os
import re
import socket
import stat
import threading
import time

import pytest

from conftest import TYLProcess

STATE = (b'{\n  "version": 4,\n  "terraform_version": "1.0.3",\n  "serial": 1,\n'
         b'  "lineage": "3f0b9c8e-1111-2222-3333-444455556666",\n  "outputs": {},\n'
         b'  "resources": []\n}\n')
STATE2 = STATE.replace(b'"serial": 1', b'"serial": 2')

# A holder's lock with unusual spacing, key order and a newline: a server
# that re-encodes instead of keeping the bytes cannot send this back.
ODD_LOCK = (b'{ "Who" :"bob@ci-07",\n  "ID":  "odd-lock-0001" , "Operation":"OperationTypeApply",'
            b'"Info":"", "Version":"1.0.3","Created":"2026-08-21T10:11:12.5Z",  "Path":""}')
ODD_ID = 'odd-lock-0001'

EMPTY_MD5 = '1B2M2Y8AsgTpgAmY7PhCfg=='
BAD_ENV_NAMES = [
    ('missing', None),
    ('empty', ''),
    ('dotdot-slash', '../x'),
    ('dotdot-slash-encoded', '..%2Fx'),
    ('slash', 'a/b'),
    ('slash-encoded', 'a%2Fb'),
    ('dotdot-encoded', '%2e%2e'),
    ('dotdot', '..'),
    ('dot', '.'),
    ('nul', '%00'),
    ('nul-suffix', 'app%00'),
    ('newline', '%0a'),
    ('newline-suffix', 'app%0a'),
    ('129-chars', 'a' * 129),
    ('leading-dash', '-app'),
    ('space', 'a%20b'),
]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def lock_info(lock_id, who='alice@ci-01'):
    """A LockInfo body as Terraform sends it: compact JSON, seven keys."""
    return json.dumps({'ID': lock_id, 'Operation': 'OperationTypeApply', 'Info': '',
                       'Who': who, 'Version': '1.0.3',
                       'Created': '2026-08-21T10:11:12.123456789Z', 'Path': ''},
                      separators=(',', ':')).encode('utf-8')


def md5_b64(body):
    return base64.b64encode(hashlib.md5(body).digest()).decode('ascii')


def req(server, method, path, body=None, headers=None, connection=None):
    """server.request, plus the rule that holds for every answer: no 3xx."""
    status, response_headers, data = server.request(method, path, body=body, headers=headers,
                                                    connection=connection)
    assert not 300 <= status < 400, (method, path, status, response_headers)
    return status, response_headers, data


def terraform_headers(body):
    return {'Content-Type': 'application/json', 'Content-MD5': md5_b64(body)}


def get_state(server, env):
    status, _, data = req(server, 'GET', '/?env=' + env)
    assert status in (200, 204), (status, data)
    return data if status == 200 else None


def write(server, env, body, lock_id=None, method='POST'):
    path = '/?env=' + env + ('' if lock_id is None else '&ID=' + lock_id)
    return req(server, method, path, body, terraform_headers(body))


def lock(server, env, body, method='LOCK', path='/lock'):
    return req(server, method, path + '?env=' + env, body, terraform_headers(body))


def unlock(server, env, body, method='UNLOCK', path='/unlock'):
    return req(server, method, path + '?env=' + env, body, terraform_headers(body))


def holder_of(server, env):
    """The held lock's bytes as a conflicting LOCK reports them, or None when free.

    Probing with a fresh ID would take a free lock, so it is released again.
    """
    probe = lock_info('probe-' + os.urandom(6).hex())
    status, _, data = lock(server, env, probe)
    if status == 200:
        assert unlock(server, env, probe)[0] == 200
        return None
    assert status == 423, (status, data)
    return data


def data_files(server):
    """Every file under the server's data directory, relative, sorted."""
    found = []
    for directory, _, files in os.walk(server.data_path):
        for name in files:
            found.append(os.path.relpath(os.path.join(directory, name), server.data_path))
    return sorted(found)


def env_files(server, env):
    directory = os.path.join(server.data_path, env)
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else None


def assert_data_dir_untouched(server):
    path = server.data_path
    assert not os.path.exists(path) or os.listdir(path) == [], os.listdir(path)


class RawConnection(object):
    """A plain socket to the server: send exact bytes, read one response."""

    def __init__(self, server, timeout=10):
        self.sock = socket.create_connection(('127.0.0.1', server.port), timeout=timeout)

    def send(self, data):
        self.sock.sendall(data)

    def response(self, method='GET'):
        response = http.client.HTTPResponse(self.sock, method=method)
        response.begin()
        body = response.read()
        assert not 300 <= response.status < 400, response.status
        return response.status, dict(response.getheaders()), body

    def exchange(self, data, method='GET'):
        self.send(data)
        return self.response(method)

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def raw_request(method, path, headers=(), body=b'', length=True):
    lines = ['%s %s HTTP/1.1' % (method, path), 'Host: 127.0.0.1']
    lines += ['%s: %s' % header for header in headers]
    if length:
        lines.append('Content-Length: %d' % len(body))
    return ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1') + body


def chunked(*pieces):
    return b''.join(b'%x\r\n%s\r\n' % (len(p), p) for p in pieces if p) + b'0\r\n\r\n'


def write_plugin(directory, module, source):
    directory.mkdir(exist_ok=True)
    (directory / (module + '.py')).write_text(source)
    return str(directory)


def access_lines(server):
    return [line for line in server.log().splitlines() if ' 127.0.0.1 "' in line]


@pytest.fixture(scope='module')
def shared_server(tmp_path_factory):
    """One server for the many small body-validation cases; each uses its own env."""
    server = TYLProcess(tmp_path_factory.mktemp('shared')).start()
    yield server
    server.kill()


# --------------------------------------------------------------------------
# URLs, methods and routing
# --------------------------------------------------------------------------

def test_status_document_lists_environments(tyl_server):
    assert lock(tyl_server, 'app', lock_info('L1'))[0] == 200
    assert write(tyl_server, 'other', STATE)[0] == 200
    status, headers, data = req(tyl_server, 'GET', '/state')
    assert status == 200
    assert headers['Content-Type'].startswith('application/json')
    document = json.loads(data)
    assert document['backend_module'] == 'file_backend.FileBackend'
    assert document['post_processor_modules'] == []
    environments = {e['environment_name']: e for e in document['environments']}
    assert {'app', 'other'} <= set(environments)
    for environment in environments.values():
        assert {'environment_name', 'lock_state', 'backend_status', 'post_processors'} <= set(environment)
        assert environment['post_processors'] == []
    assert environments['app']['lock_state'] == 'LOCKED'
    assert environments['other']['lock_state'] == 'UNLOCKED'


def test_query_parameter_order_and_encoding_do_not_matter(tyl_server):
    assert lock(tyl_server, 'app', lock_info('L1'))[0] == 200
    assert req(tyl_server, 'POST', '/?ID=L1&env=app', STATE, terraform_headers(STATE))[0] == 200
    assert get_state(tyl_server, 'app') == STATE
    assert req(tyl_server, 'POST', '/?env=app&ID=L1', STATE2, terraform_headers(STATE2))[0] == 200
    assert get_state(tyl_server, '%61pp') == STATE2
    assert req(tyl_server, 'PUT', '/?ID=L%31&env=%61pp', STATE, terraform_headers(STATE))[0] == 200
    assert get_state(tyl_server, 'app') == STATE


@pytest.mark.parametrize('method, path', [
    ('GET', '/?env=app&env=app'),
    ('GET', '/?env=app&env=other'),
    ('POST', '/?env=app&env=other'),
    ('POST', '/?env=app&ID=L1&ID=L1'),
    ('POST', '/?ID=L1&env=app&ID=L2'),
    ('PUT', '/?env=app&ID=L1&ID=L2'),
    ('DELETE', '/?env=app&ID=L1&ID=L2'),
    ('DELETE', '/?env=app&env=app'),
    ('LOCK', '/lock?env=app&env=other'),
    ('UNLOCK', '/unlock?env=app&env=other'),
    ('DELETE', '/unlock?env=app&env=other'),
])
def test_doubled_env_or_id_is_400(tyl_server, method, path):
    check_doubled_query_is_400(tyl_server, method, path)


@pytest.mark.parametrize('method, path', [
    ('GET', '/?env=app&ID=L1&ID=L2'),
    ('LOCK', '/lock?env=app&ID=L1&ID=L2'),
    ('UNLOCK', '/unlock?env=app&ID=L1&ID=L2'),
])
def test_doubled_id_is_400_even_where_id_is_not_used(tyl_server, method, path):
    """The rule says a doubled ID is a 400, whatever the request."""
    check_doubled_query_is_400(tyl_server, method, path)


def check_doubled_query_is_400(tyl_server, method, path):
    assert lock(tyl_server, 'app', lock_info('L1'))[0] == 200
    assert write(tyl_server, 'app', STATE, 'L1')[0] == 200
    body = {'LOCK': lock_info('L1'), 'UNLOCK': lock_info('L1'), 'POST': STATE2, 'PUT': STATE2}.get(method)
    headers = terraform_headers(body) if body is not None else {}
    status, _, data = req(tyl_server, method, path, body, headers)
    assert status == 400, (status, data)
    assert get_state(tyl_server, 'app') == STATE
    assert json.loads(holder_of(tyl_server, 'app'))['ID'] == 'L1'
    assert get_state(tyl_server, 'other') is None


def test_alternative_methods_for_write_lock_and_unlock(tyl_server):
    # PUT writes.
    assert write(tyl_server, 'app', STATE, method='PUT')[0] == 200
    assert get_state(tyl_server, 'app') == STATE
    # POST /lock locks, DELETE /unlock unlocks.
    assert lock(tyl_server, 'app', lock_info('A'), method='POST')[0] == 200
    assert json.loads(holder_of(tyl_server, 'app'))['ID'] == 'A'
    assert unlock(tyl_server, 'app', lock_info('A'), method='DELETE')[0] == 200
    assert holder_of(tyl_server, 'app') is None
    # DELETE /lock unlocks (GitLab's layout).
    assert lock(tyl_server, 'app', lock_info('B'), method='POST')[0] == 200
    assert unlock(tyl_server, 'app', lock_info('B'), method='DELETE', path='/lock')[0] == 200
    assert holder_of(tyl_server, 'app') is None
    # UNLOCK /lock too.
    assert lock(tyl_server, 'app', lock_info('B2'))[0] == 200
    assert unlock(tyl_server, 'app', lock_info('B2'), path='/lock')[0] == 200
    assert holder_of(tyl_server, 'app') is None
    # LOCK and UNLOCK on the state URL (one URL for everything).
    assert lock(tyl_server, 'app', lock_info('C'), path='/')[0] == 200
    assert lock(tyl_server, 'app', lock_info('D'), path='/')[0] == 423
    assert unlock(tyl_server, 'app', lock_info('C'), path='/')[0] == 200
    assert holder_of(tyl_server, 'app') is None
    # The state survived all of that.
    assert get_state(tyl_server, 'app') == STATE


@pytest.mark.parametrize('method', ['FOO', 'get', 'Get', 'PATCH', 'OPTIONS', 'PROPFIND'])
def test_unknown_method_is_405_with_allow(tyl_server, method):
    status, headers, _ = req(tyl_server, method, '/?env=app')
    assert status == 405
    allowed = [m.strip() for m in headers['Allow'].split(',')]
    assert 'GET' in allowed and 'LOCK' in allowed
    assert method not in allowed
    # The server is still there.
    assert req(tyl_server, 'GET', '/?env=app')[0] == 204


@pytest.mark.parametrize('method, path, allowed_sample', [
    ('GET', '/lock?env=app', 'LOCK'),
    ('PUT', '/lock?env=app', 'LOCK'),
    ('GET', '/unlock?env=app', 'UNLOCK'),
    ('POST', '/unlock?env=app', 'UNLOCK'),
    ('LOCK', '/unlock?env=app', 'UNLOCK'),
    ('POST', '/state', 'GET'),
    ('LOCK', '/state', 'GET'),
    ('DELETE', '/state', 'GET'),
])
def test_known_method_on_wrong_path_is_405_with_allow(tyl_server, method, path, allowed_sample):
    body = lock_info('L1')
    status, headers, _ = req(tyl_server, method, path, body, terraform_headers(body))
    assert status == 405
    allowed = [m.strip() for m in headers['Allow'].split(',')]
    assert allowed_sample in allowed
    assert method not in allowed
    assert_data_dir_untouched(tyl_server)
    assert holder_of(tyl_server, 'app') is None


@pytest.mark.parametrize('path', [
    '/foo?env=app', '/lock/?env=app', '/unlock/x?env=app', '/state/', '/lock//?env=app',
    '/LOCK?env=app', '/index.html', '/%2e%2e/?env=app', '/app?env=app',
])
def test_unknown_path_is_404(tyl_server, path):
    for method in ('GET', 'POST', 'LOCK'):
        body = lock_info('L1') if method == 'LOCK' else STATE
        status, _, _ = req(tyl_server, method, path, body, terraform_headers(body))
        assert status == 404, (method, path, status)
    assert_data_dir_untouched(tyl_server)


def test_never_a_redirect(tyl_server):
    """No 3xx for odd but plausible URLs; `req` asserts it on every answer."""
    seen = []
    for method in ('GET', 'POST', 'PUT', 'DELETE', 'LOCK', 'UNLOCK', 'HEAD', 'FOO'):
        for path in ('/', '//?env=app', '/?env=app', '/?env=app/', '/lock', '/lock/', '/unlock/', '/state/',
                     '/state?env=app', '/./?env=app', '/a/../?env=app', '/lock?env=a%2F..%2Fb',
                     'http://127.0.0.1/?env=app', '*'):
            with RawConnection(tyl_server) as raw:
                body = lock_info('R') if method in ('LOCK', 'UNLOCK') else STATE
                status, _, _ = raw.exchange(raw_request(method, path, body=body), method)
                seen.append(status)
    assert seen and all(not 300 <= s < 400 for s in seen)
    # And after all of that the server still serves.
    assert req(tyl_server, 'GET', '/state')[0] == 200


# --------------------------------------------------------------------------
# Environment names
# --------------------------------------------------------------------------

@pytest.mark.parametrize('label, name', BAD_ENV_NAMES, ids=[n[0] for n in BAD_ENV_NAMES])
def test_bad_environment_name_is_400_and_creates_nothing(tyl_server, label, name):
    query = '' if name is None else '?env=' + name
    attempts = [
        ('GET', '/' + query, None),
        ('POST', '/' + query, STATE),
        ('PUT', '/' + query, STATE),
        ('DELETE', '/' + query, None),
        ('LOCK', '/lock' + query, lock_info('L1')),
        ('POST', '/lock' + query, lock_info('L1')),
        ('LOCK', '/' + query, lock_info('L1')),
        ('UNLOCK', '/unlock' + query, lock_info('L1')),
        ('UNLOCK', '/unlock' + query, b''),
        ('DELETE', '/lock' + query, b''),
    ]
    for method, path, body in attempts:
        headers = terraform_headers(body) if body is not None else {}
        status, _, data = req(tyl_server, method, path, body, headers)
        assert status == 400, (method, path, status, data)
        assert b'\n' not in data.rstrip(b'\n')
    assert_data_dir_untouched(tyl_server)
    environments = json.loads(req(tyl_server, 'GET', '/state')[2])['environments']
    assert environments == []


def test_name_of_128_characters_is_fine_and_names_are_exact(tyl_server):
    longest = 'a' + 'b.-_9' * 25 + 'xy'
    assert len(longest) == 128
    assert lock(tyl_server, longest, lock_info('L1'))[0] == 200
    assert write(tyl_server, longest, STATE, 'L1')[0] == 200
    assert get_state(tyl_server, longest) == STATE
    assert unlock(tyl_server, longest, lock_info('L1'))[0] == 200

    assert write(tyl_server, 'app.tfstate', STATE)[0] == 200
    assert get_state(tyl_server, 'app') is None
    assert write(tyl_server, 'app', STATE2)[0] == 200
    assert get_state(tyl_server, 'app.tfstate') == STATE
    assert get_state(tyl_server, 'app') == STATE2
    assert lock(tyl_server, 'app', lock_info('X'))[0] == 200
    assert lock(tyl_server, 'app.tfstate', lock_info('Y'))[0] == 200
    assert lock(tyl_server, 'APP', lock_info('Z'))[0] == 200


# --------------------------------------------------------------------------
# Bodies: Content-Length, chunked, limits, Content-MD5
# --------------------------------------------------------------------------

def test_force_unlock_empty_chunked_body_keeps_connection_alive(tyl_server):
    """Terraform's force-unlock, byte for byte, then more requests on the same socket."""
    assert lock(tyl_server, 'app', ODD_LOCK)[0] == 200
    force_unlock = (b'UNLOCK /unlock?env=app HTTP/1.1\r\nHost: 127.0.0.1\r\n'
                    b'User-Agent: Go-http-client/1.1\r\nTransfer-Encoding: chunked\r\n'
                    b'Content-Md5: ' + EMPTY_MD5.encode() + b'\r\n'
                    b'Content-Type: application/json\r\nAccept-Encoding: gzip\r\n\r\n0\r\n\r\n')
    with RawConnection(tyl_server) as raw:
        status, headers, _ = raw.exchange(force_unlock, 'UNLOCK')
        assert status == 200
        assert headers.get('Connection', '').lower() != 'close'
        # Same socket: the lock is free now, so another ID gets it.
        status, headers, _ = raw.exchange(raw_request('LOCK', '/lock?env=app', body=lock_info('NEW')),
                                          'LOCK')
        assert status == 200
        status, _, _ = raw.exchange(force_unlock, 'UNLOCK')
        assert status == 200
        status, _, _ = raw.exchange(raw_request('GET', '/?env=app', length=False))
        assert status == 204
    assert holder_of(tyl_server, 'app') is None


def test_force_unlock_with_http_client_encode_chunked(tyl_server):
    assert lock(tyl_server, 'app', lock_info('HOLDER'))[0] == 200
    connection = tyl_server.connection()
    try:
        connection.request('UNLOCK', '/unlock?env=app', body=b'', encode_chunked=True,
                           headers={'Transfer-Encoding': 'chunked', 'Content-Type': 'application/json',
                                    'Content-MD5': EMPTY_MD5})
        response = connection.getresponse()
        assert response.status == 200
        response.read()
        status, _, _ = req(tyl_server, 'LOCK', '/lock?env=app', lock_info('NEXT'), connection=connection)
        assert status == 200
    finally:
        connection.close()


def test_chunked_write_with_several_chunks_and_extensions(tyl_server):
    pieces = [STATE[:7], STATE[7:8], STATE[8:40], STATE[40:]]
    body = b''.join(b'%x;ext=1\r\n%s\r\n' % (len(p), p) for p in pieces) + b'0\r\nX-Trailer: 1\r\n\r\n'
    with RawConnection(tyl_server) as raw:
        status, _, _ = raw.exchange(raw_request('POST', '/?env=app', body=body, length=False,
                                                headers=[('Transfer-Encoding', 'chunked'),
                                                         ('Content-MD5', md5_b64(STATE))]), 'POST')
        assert status == 200
        status, _, data = raw.exchange(raw_request('GET', '/?env=app', length=False))
        assert (status, data) == (200, STATE)


MALFORMED_FRAMING = [
    ('bad-size', [('Transfer-Encoding', 'chunked')], b'zz\r\n{}\r\n0\r\n\r\n'),
    ('negative-size', [('Transfer-Encoding', 'chunked')], b'-2\r\n{}\r\n0\r\n\r\n'),
    ('no-crlf-after-data', [('Transfer-Encoding', 'chunked')], b'2\r\n{}XX0\r\n\r\n'),
    ('data-longer-than-size', [('Transfer-Encoding', 'chunked')], b'1\r\n{}\r\n0\r\n\r\n'),
    ('empty-size-line', [('Transfer-Encoding', 'chunked')], b'\r\n{}\r\n0\r\n\r\n'),
    ('truncated', [('Transfer-Encoding', 'chunked')], b'10\r\n{}'),
    ('no-last-chunk', [('Transfer-Encoding', 'chunked')], b'2\r\n{}\r\n'),
    ('both-framings', [('Transfer-Encoding', 'chunked'), ('Content-Length', '8')],
     b'2\r\n{}\r\n0\r\n\r\n'),
    ('gzip-chunked', [('Transfer-Encoding', 'gzip, chunked')], b'2\r\n{}\r\n0\r\n\r\n'),
    ('two-lengths', [('Content-Length', '2'), ('Content-Length', '3')], b'{} '),
    ('signed-length', [('Content-Length', '+2')], b'{}'),
    ('hex-length', [('Content-Length', '0x2')], b'{}'),
    # U+00B2 is one byte in a Latin-1 header and str.isdigit() says yes to it.
    ('superscript-length', [('Content-Length', '\u00b2')], b'{}'),
    ('short-body', [('Content-Length', '50')], b'{}'),
]


@pytest.mark.parametrize('label, framing, body', MALFORMED_FRAMING,
                         ids=[case[0] for case in MALFORMED_FRAMING])
def test_malformed_body_framing_is_400(tyl_server, label, framing, body):
    with RawConnection(tyl_server, timeout=10) as raw:
        raw.send(raw_request('POST', '/?env=app', headers=framing, length=False) + body)
        if label in ('truncated', 'no-last-chunk', 'short-body'):
            raw.sock.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        status, headers, data = raw.response('POST')
        assert time.monotonic() - started < 5
    assert status == 400, (status, data)
    assert headers.get('Connection', '').lower() == 'close'
    assert get_state(tyl_server, 'app') is None


def test_unparsable_content_length_cannot_smuggle_a_request(tyl_server):
    """A body the server did not read must never be taken as the next request."""
    assert write(tyl_server, 'prod', STATE)[0] == 200
    smuggled = b'DELETE /?env=prod HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n'
    for length in ('\u00b2', '\u00b9\u00b3', '+48', '4 8'):
        with RawConnection(tyl_server, timeout=5) as raw:
            raw.send(raw_request('POST', '/?env=other', length=False,
                                 headers=[('Content-Length', length)]) + smuggled)
            status, headers, data = raw.response('POST')
            # Whatever else the server sends on this connection, until it closes.
            rest = b''
            for _ in range(100):
                try:
                    piece = raw.sock.recv(65536)
                except socket.timeout:
                    break
                if not piece:
                    break
                rest += piece
        assert get_state(tyl_server, 'prod') == STATE, (length, 'smuggled DELETE ran', rest)
        assert rest == b'', (length, rest)
        assert status == 400, (length, status, data)
        assert headers.get('Connection', '').lower() == 'close', (length, headers)


def test_body_over_max_body_bytes_is_413_before_it_is_read(tyl_factory):
    server = tyl_factory(MAX_BODY_BYTES=1000).start()
    padding = 1000 - len(b'{"pad":""}')
    fits = b'{"pad":"' + b'x' * padding + b'"}'
    assert len(fits) == 1000
    over = b'{"pad":"' + b'x' * (padding + 1) + b'"}'

    # A huge announced length and no body at all: the answer comes at once.
    for method, path in (('POST', '/?env=app'), ('LOCK', '/lock?env=app'), ('PUT', '/?env=app')):
        with RawConnection(server, timeout=5) as raw:
            started = time.monotonic()
            status, headers, _ = raw.exchange(
                raw_request(method, path, length=False, headers=[('Content-Length', '10000000000')]),
                method)
            elapsed = time.monotonic() - started
        assert status == 413, (method, status)
        assert elapsed < 2, elapsed
        assert headers.get('Connection', '').lower() == 'close'

    # One byte over, with Content-Length.
    with RawConnection(server) as raw:
        status, _, _ = raw.exchange(raw_request('POST', '/?env=app', body=over), 'POST')
    assert status == 413
    # One byte over, chunked (no length announced up front): also 413.
    with RawConnection(server) as raw:
        status, _, _ = raw.exchange(raw_request(
            'POST', '/?env=app', length=False, headers=[('Transfer-Encoding', 'chunked')],
            body=chunked(over[:600], over[600:])), 'POST')
    assert status == 413
    # A real oversized body, bigger than the socket buffers: the client's
    # send may fail once the server stops reading, but the 413 is there.
    big = b'{"pad":"' + b'x' * (8 * 1024 * 1024) + b'"}'
    with RawConnection(server, timeout=10) as raw:
        started = time.monotonic()
        try:
            raw.send(raw_request('PUT', '/?env=app', body=big))
        except OSError:
            pass
        status, _, data = raw.response('PUT')
        assert time.monotonic() - started < 5
    assert status == 413, data
    # A chunk header announcing a huge chunk, with no data following.
    with RawConnection(server, timeout=5) as raw:
        status, _, _ = raw.exchange(raw_request(
            'POST', '/?env=app', length=False, headers=[('Transfer-Encoding', 'chunked')],
            body=b'ffffffffff\r\n'), 'POST')
    assert status == 413
    assert get_state(server, 'app') is None
    assert_data_dir_untouched(server)

    # Exactly the limit is fine.
    assert write(server, 'app', fits)[0] == 200
    assert get_state(server, 'app') == fits


def test_content_md5_mismatch_is_400_and_nothing_is_stored(tyl_server):
    wrong = md5_b64(STATE2)
    status, _, _ = req(tyl_server, 'POST', '/?env=app', STATE, {'Content-MD5': wrong})
    assert status == 400
    status, _, _ = req(tyl_server, 'POST', '/?env=app', STATE, {'Content-MD5': 'not base64!'})
    assert status == 400
    status, _, _ = req(tyl_server, 'LOCK', '/lock?env=app', lock_info('L1'), {'Content-MD5': wrong})
    assert status == 400
    # The body was read in full, so the connection stays usable.
    connection = tyl_server.connection()
    try:
        status, _, _ = req(tyl_server, 'PUT', '/?env=app', STATE, {'Content-MD5': wrong},
                           connection=connection)
        assert status == 400
        assert req(tyl_server, 'GET', '/?env=app', connection=connection)[0] == 204
    finally:
        connection.close()
    assert get_state(tyl_server, 'app') is None
    assert_data_dir_untouched(tyl_server)
    assert holder_of(tyl_server, 'app') is None
    # The right one, in upper-case header spelling as Go sends it, is accepted.
    status, _, _ = req(tyl_server, 'POST', '/?env=app', STATE, {'Content-Md5': md5_b64(STATE)})
    assert status == 200
    assert get_state(tyl_server, 'app') == STATE


# --------------------------------------------------------------------------
# GET, write, LOCK, UNLOCK, DELETE
# --------------------------------------------------------------------------

def test_get_returns_bytes_content_type_and_padded_content_md5(tyl_server):
    status, headers, data = req(tyl_server, 'GET', '/?env=app')
    assert (status, data) == (204, b'')
    assert write(tyl_server, 'app', STATE)[0] == 200
    status, headers, data = req(tyl_server, 'GET', '/?env=app')
    assert status == 200
    assert data == STATE
    assert headers['Content-Type'].split(';')[0].strip() == 'application/json'
    assert headers['Content-MD5'] == md5_b64(STATE)
    assert len(headers['Content-MD5']) == 24 and headers['Content-MD5'].endswith('==')
    assert base64.b64decode(headers['Content-MD5'], validate=True) == hashlib.md5(STATE).digest()


BAD_STATES = [b'NaN', b'Infinity', b'-Infinity', b'{"a": NaN}', b'{"a": [Infinity]}',
              b'{"a": -Infinity}', b'null', b'[]', b'"x"', b'1', b'true', b'', b'   ',
              b'{"version": 4', b'{"version": 4,}', b'{"a":1}{"b":2}', b'\xff\xfe{}', b"{'a': 1}",
              b'{"a":' + b'[' * 100000 + b']' * 100000 + b'}']


@pytest.mark.parametrize('index', range(len(BAD_STATES)),
                         ids=[(repr(b)[2:-1] or 'empty')[:20] for b in BAD_STATES])
def test_write_of_anything_but_a_json_object_is_400(shared_server, index):
    server, body, env = shared_server, BAD_STATES[index], 'bad-state-%d' % index
    assert lock(server, env, ODD_LOCK)[0] == 200
    assert write(server, env, STATE, ODD_ID)[0] == 200
    files = env_files(server, env)
    for lock_id in (ODD_ID, None):
        status, _, data = write(server, env, body, lock_id)
        assert status == 400, (lock_id, status, data)
        assert b'\n' not in data.rstrip(b'\n')
    assert get_state(server, env) == STATE
    assert holder_of(server, env) == ODD_LOCK
    assert env_files(server, env) == files
    # The same body on an environment that is neither locked nor stored.
    assert write(server, 'fresh-' + env, body)[0] == 400
    assert get_state(server, 'fresh-' + env) is None
    assert not os.path.exists(os.path.join(server.data_path, 'fresh-' + env))


def test_opentofu_encrypted_state_is_accepted(tyl_server):
    encrypted = (b'{"serial":1,"lineage":"l","meta":{},"encrypted_data":"'
                 + base64.b64encode(os.urandom(48)) + b'","encryption_version":"v0"}')
    assert write(tyl_server, 'tofu', encrypted)[0] == 200
    assert get_state(tyl_server, 'tofu') == encrypted


def test_write_follows_the_lock(tyl_server):
    # Free and no ID: accepted.
    assert write(tyl_server, 'app', STATE)[0] == 200
    assert lock(tyl_server, 'app', ODD_LOCK)[0] == 200
    # Locked, no ID / wrong ID / empty ID: 423 with the holder's exact bytes, nothing stored.
    for lock_id in (None, 'someone-else', ''):
        status, headers, data = write(tyl_server, 'app', STATE2, lock_id)
        assert status == 423, (lock_id, status)
        assert data == ODD_LOCK
        assert headers['Content-Type'].split(';')[0] == 'application/json'
        assert get_state(tyl_server, 'app') == STATE
    # The holder's ID: accepted (POST and PUT).
    assert write(tyl_server, 'app', STATE2, ODD_ID)[0] == 200
    assert get_state(tyl_server, 'app') == STATE2
    assert write(tyl_server, 'app', STATE, ODD_ID, method='PUT')[0] == 200
    assert get_state(tyl_server, 'app') == STATE
    assert unlock(tyl_server, 'app', ODD_LOCK)[0] == 200
    # An ID while nothing is locked: 409, nothing stored.
    status, _, data = write(tyl_server, 'app', STATE2, ODD_ID)
    assert status == 409, data
    assert get_state(tyl_server, 'app') == STATE
    status, _, _ = write(tyl_server, 'never', STATE2, 'ghost')
    assert status == 409
    assert get_state(tyl_server, 'never') is None
    assert not os.path.exists(os.path.join(tyl_server.data_path, 'never', 'terraform.tfstate'))


BAD_LOCKS = [b'', b'   ', b'{}', b'{"ID": ""}', b'{"ID": 5}', b'{"ID": null}', b'{"ID": ["a"]}',
             b'{"id": "lower-case-key"}', b'[]', b'"ID"', b'null', b'{"ID": "x"',
             b'{"ID": "x", "n": NaN}', b'\xff{"ID":"x"}',
             b'{"ID": "x", "n": ' + b'[' * 100000 + b']' * 100000 + b'}']


@pytest.mark.parametrize('index', range(len(BAD_LOCKS)),
                         ids=[(repr(b)[2:-1] or 'empty')[:20] for b in BAD_LOCKS])
def test_lock_body_must_be_json_with_a_string_id(shared_server, index):
    server, body, env = shared_server, BAD_LOCKS[index], 'bad-lock-%d' % index
    for method, path in (('LOCK', '/lock'), ('POST', '/lock'), ('LOCK', '/')):
        status, _, data = lock(server, env, body, method=method, path=path)
        assert status == 400, (method, path, status, data)
    assert not os.path.exists(os.path.join(server.data_path, env))
    assert holder_of(server, env) is None


def test_lock_free_same_id_and_conflict(tyl_server):
    status, _, _ = lock(tyl_server, 'app', ODD_LOCK)
    assert status == 200
    # The same ID again (a retry after a lost reply): 200.
    assert lock(tyl_server, 'app', ODD_LOCK)[0] == 200
    assert lock(tyl_server, 'app', lock_info(ODD_ID, who='retry@elsewhere'))[0] == 200
    # Another ID: 423 and the holder's body byte for byte.
    for method, path in (('LOCK', '/lock'), ('POST', '/lock'), ('LOCK', '/')):
        status, headers, data = lock(tyl_server, 'app', lock_info('intruder'), method=method, path=path)
        assert status == 423
        assert data == ODD_LOCK
        assert headers['Content-Type'].split(';')[0] == 'application/json'
    # The lock file is the holder's bytes too.
    with open(os.path.join(tyl_server.data_path, 'app', 'lock.json'), 'rb') as stream:
        assert stream.read() == ODD_LOCK


def test_unlock_rules(tyl_server):
    # Nothing locked: 200 for an ID and for an empty body.
    assert unlock(tyl_server, 'app', lock_info('nobody'))[0] == 200
    assert unlock(tyl_server, 'app', b'')[0] == 200
    # Different ID: 409 with the holder, lock kept.
    assert lock(tyl_server, 'app', ODD_LOCK)[0] == 200
    for method, path in (('UNLOCK', '/unlock'), ('DELETE', '/unlock'), ('DELETE', '/lock'),
                         ('UNLOCK', '/lock'), ('UNLOCK', '/')):
        status, _, data = unlock(tyl_server, 'app', lock_info('intruder'), method=method, path=path)
        assert (status, data) == (409, ODD_LOCK), (method, path)
    assert holder_of(tyl_server, 'app') == ODD_LOCK
    # Matching ID (a different body, same ID: OpenTofu re-encodes it): 200, lock gone.
    assert unlock(tyl_server, 'app', lock_info(ODD_ID))[0] == 200
    assert holder_of(tyl_server, 'app') is None
    # Empty body (Terraform's force-unlock, here with Content-Length: 0): 200, lock gone.
    assert lock(tyl_server, 'app', lock_info('L2'))[0] == 200
    status, _, _ = req(tyl_server, 'UNLOCK', '/unlock?env=app', b'',
                       {'Content-Type': 'application/json', 'Content-MD5': EMPTY_MD5})
    assert status == 200
    assert holder_of(tyl_server, 'app') is None
    # And with no body and no length at all.
    assert lock(tyl_server, 'app', lock_info('L3'))[0] == 200
    with RawConnection(tyl_server) as raw:
        status, _, _ = raw.exchange(raw_request('UNLOCK', '/unlock?env=app', length=False), 'UNLOCK')
    assert status == 200
    assert holder_of(tyl_server, 'app') is None
    assert not os.path.exists(os.path.join(tyl_server.data_path, 'app', 'lock.json'))


def test_force_unlock_can_be_disabled(tyl_factory):
    server = tyl_factory(FORCE_UNLOCK=False).start()
    assert lock(server, 'app', ODD_LOCK)[0] == 200
    status, _, data = unlock(server, 'app', b'')
    assert status == 403, data
    with RawConnection(server) as raw:
        status, _, _ = raw.exchange(raw_request(
            'UNLOCK', '/unlock?env=app', length=False,
            headers=[('Transfer-Encoding', 'chunked'), ('Content-Type', 'application/json'),
                     ('Content-MD5', EMPTY_MD5)], body=b'0\r\n\r\n'), 'UNLOCK')
    assert status == 403
    assert unlock(server, 'app', b'', method='DELETE', path='/lock')[0] == 403
    assert holder_of(server, 'app') == ODD_LOCK
    assert unlock(server, 'app', lock_info('intruder'))[0] == 409
    assert unlock(server, 'app', ODD_LOCK)[0] == 200
    assert holder_of(server, 'app') is None


def test_delete_state(tyl_server):
    assert write(tyl_server, 'app', STATE)[0] == 200
    status, _, _ = req(tyl_server, 'DELETE', '/?env=app')
    assert status == 200
    assert get_state(tyl_server, 'app') is None
    assert req(tyl_server, 'GET', '/?env=app')[0] == 204
    # Deleting nothing is fine.
    assert req(tyl_server, 'DELETE', '/?env=app')[0] == 200

    assert write(tyl_server, 'app', STATE)[0] == 200
    assert lock(tyl_server, 'app', ODD_LOCK)[0] == 200
    for path in ('/?env=app', '/?env=app&ID=intruder'):
        status, _, data = req(tyl_server, 'DELETE', path)
        assert (status, data) == (409, ODD_LOCK), path
        assert get_state(tyl_server, 'app') == STATE
    status, _, _ = req(tyl_server, 'DELETE', '/?ID=%s&env=app' % ODD_ID)
    assert status == 200
    assert get_state(tyl_server, 'app') is None
    assert holder_of(tyl_server, 'app') == ODD_LOCK


# --------------------------------------------------------------------------
# Plugins: failing backends, PyTerraBackTYL backends, post-processors
# --------------------------------------------------------------------------

BOOM_BACKEND = '''
import tylstore


class BoomBackend(tylstore.TYLPersistent):
    def __init__(self, environment, constants, **kwargs):
        self.environment = environment
        self.lock = ''
        self.state = ''

    def set_locked(self, state_obj, **kwargs):
        if self.lock:
            return False
        self.lock = kwargs['raw']
        return True

    def set_unlocked(self, state_obj, **kwargs):
        self.lock = ''
        return True

    def get_lock_state(self):
        return self.lock

    def store_tfstate(self, tfstate_obj, **kwargs):
        if 'serial' in tfstate_obj and tfstate_obj['serial'] == 13:
            raise OSError('disk on fire\\nsecond line\\n\\tthird')
        self.state = kwargs['raw']

    def get_tfstate(self):
        raise RuntimeError('boom from get_tfstate in ' + self.environment)
'''


def test_backend_exception_is_one_line_500_and_server_keeps_serving(tyl_factory, tmp_path):
    plugins = write_plugin(tmp_path / 'plugins', 'boom_backend', BOOM_BACKEND)
    server = tyl_factory(BACKEND_PLUGINS_PATH=plugins, BACKEND_CLASS='boom_backend.BoomBackend').start()
    connection = server.connection()
    try:
        for _ in range(3):
            status, headers, data = req(server, 'GET', '/?env=app', connection=connection)
            assert status == 500
            assert data == b'RuntimeError: boom from get_tfstate in app\n'
            assert headers['Content-Type'].startswith('text/plain')
        status, _, data = req(server, 'POST', '/?env=app', b'{"serial":13}',
                              connection=connection)
        assert status == 500
        assert data.count(b'\n') == 1 and data.endswith(b'\n')
        assert b'OSError' in data and b'disk on fire' in data and b'third' in data
        assert b'Traceback' not in data and b'File "' not in data
        # Still serving, on the same connection and on new ones.
        assert req(server, 'LOCK', '/lock?env=app', lock_info('L1'), connection=connection)[0] == 200
        assert req(server, 'POST', '/?env=app&ID=L1', b'{"serial":1}', connection=connection)[0] == 200
    finally:
        connection.close()
    assert lock(server, 'app', lock_info('L2'))[0] == 423
    assert unlock(server, 'app', lock_info('L1'))[0] == 200
    assert req(server, 'GET', '/state')[0] == 200
    assert server.process.poll() is None


def test_health_answers_a_round_trip_to_the_storage(tyl_server, tyl_factory):
    status, headers, data = req(tyl_server, 'GET', '/health')
    assert (status, data) == (200, b'ok\n')
    assert not os.path.exists(tyl_server.data_path) or os.listdir(tyl_server.data_path) == []
    assert json.loads(req(tyl_server, 'GET', '/state')[2])['environments'] == []

    # The template backend fails on first use unless told it may run.
    broken = tyl_factory('broken', BACKEND_CLASS='TEMPLATE_backend.TemplateBackend').start()
    status, _, data = req(broken, 'GET', '/health')
    assert status == 503 and data == b'storage unavailable: RuntimeError\n'


OLD_STYLE_BACKEND = '''
import json

from abc_tylstore import TYLPersistent


class OldBackend(TYLPersistent):
    """Written the PyTerraBackTYL way: `raw=''` keywords, no **kwargs."""

    def __init__(self, environment, constants):
        self.environment = environment
        self.lock = ''
        self.state = ''

    def set_locked(self, state_obj, raw=''):
        if self.lock:
            return False
        self.lock = raw
        return True

    def set_unlocked(self, state_obj, raw=''):
        if not self.lock:
            return False
        self.lock = ''
        return True

    def get_lock_state(self):
        return self.lock

    def store_tfstate(self, tfstate_obj, raw=''):
        self.state = raw

    def get_tfstate(self):
        return self.state

    def backend_status(self):
        return {'env': self.environment, 'locked': bool(self.lock)}
'''


def test_pyterrabacktyl_style_plugin_works(tyl_factory, tmp_path):
    plugins = write_plugin(tmp_path / 'plugins', 'old_backend', OLD_STYLE_BACKEND)
    server = tyl_factory(BACKEND_PLUGINS_PATH=plugins, BACKEND_CLASS='old_backend.OldBackend').start()
    assert get_state(server, 'app') is None
    assert lock(server, 'app', ODD_LOCK)[0] == 200
    assert write(server, 'app', STATE, ODD_ID)[0] == 200
    assert write(server, 'app', STATE2)[:3:2] == (423, ODD_LOCK)
    assert lock(server, 'app', lock_info('other'))[:3:2] == (423, ODD_LOCK)
    assert get_state(server, 'app') == STATE
    assert unlock(server, 'app', ODD_LOCK)[0] == 200
    assert holder_of(server, 'app') is None
    assert lock(server, 'app', lock_info('L2'))[0] == 200
    assert unlock(server, 'app', b'')[0] == 200
    assert write(server, 'app', STATE2)[0] == 200
    assert get_state(server, 'app') == STATE2
    document = json.loads(req(server, 'GET', '/state')[2])
    assert document['backend_module'] == 'old_backend.OldBackend'
    (app,) = [e for e in document['environments'] if e['environment_name'] == 'app']
    assert app['backend_status'] == {'env': 'app', 'locked': False}


FAILING_POST_PROCESSOR = '''
from tylstore import TYLNonpersistent


class Failing(TYLNonpersistent):
    def __init__(self, environment, constants, **kwargs):
        pass

    def on_locked(self, state_obj, **kwargs):
        pass

    def on_unlocked(self, state_obj, **kwargs):
        pass

    def process_tfstate(self, tfstate_obj, **kwargs):
        raise ValueError('post-processing failed')
'''


def test_failing_post_processor_does_not_change_the_answer(tyl_factory, tmp_path):
    plugins = write_plugin(tmp_path / 'plugins', 'failing_pp', FAILING_POST_PROCESSOR)
    server = tyl_factory(BACKEND_PLUGINS_PATH=plugins, POST_PROCESS_CLASSES=['failing_pp.Failing']).start()
    assert lock(server, 'app', lock_info('L1'))[0] == 200
    assert write(server, 'app', STATE, 'L1')[0] == 200
    assert write(server, 'app', STATE2, 'L1')[0] == 200
    assert get_state(server, 'app') == STATE2
    assert unlock(server, 'app', lock_info('L1'))[0] == 200
    document = json.loads(req(server, 'GET', '/state')[2])
    assert document['post_processor_modules'] == ['failing_pp.Failing']
    (app,) = [e for e in document['environments'] if e['environment_name'] == 'app']
    (processor,) = app['post_processors']
    assert processor['num_errors_logged'] == 2
    assert 'post-processing failed' in processor['recent_logged_error']


# --------------------------------------------------------------------------
# Concurrency
# --------------------------------------------------------------------------

def test_concurrent_locks_have_exactly_one_winner(tyl_server):
    count = 50
    barrier = threading.Barrier(count, timeout=30)
    results = [None] * count

    def contend(index):
        body = lock_info('contender-%02d' % index, who='t%02d@host' % index)
        connection = tyl_server.connection()
        try:
            connection.connect()
            barrier.wait()
            results[index] = req(tyl_server, 'LOCK', '/lock?env=race', body, terraform_headers(body),
                                 connection=connection)
        except Exception as error:  # reported below
            results[index] = error
        finally:
            connection.close()

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads)
    errors = [r for r in results if not isinstance(r, tuple)]
    assert not errors, errors
    winners = [i for i, r in enumerate(results) if r[0] == 200]
    assert len(winners) == 1, [r[0] for r in results]
    winner_body = lock_info('contender-%02d' % winners[0], who='t%02d@host' % winners[0])
    losers = [r for r in results if r[0] != 200]
    assert len(losers) == count - 1
    assert all(r[0] == 423 for r in losers), [r[0] for r in losers]
    assert all(r[2] == winner_body for r in losers)
    assert holder_of(tyl_server, 'race') == winner_body


def test_concurrent_cycles_on_separate_environments_do_not_mix(tyl_server):
    threads_count, cycles = 20, 20
    failures = []

    def cycle(worker):
        env = 'worker-%02d' % worker
        connection = tyl_server.connection()
        try:
            for number in range(cycles):
                lock_id = '%s-cycle-%02d' % (env, number)
                body = lock_info(lock_id)
                state = json.dumps({'version': 4, 'serial': number, 'lineage': env,
                                    'outputs': {'who': {'value': lock_id, 'type': 'string'}},
                                    'resources': []}).encode()
                steps = [
                    ('LOCK', '/lock?env=' + env, body, 200),
                    ('POST', '/?env=%s&ID=%s' % (env, lock_id), state, 200),
                ]
                for method, path, payload, expected in steps:
                    status, _, data = req(tyl_server, method, path, payload, terraform_headers(payload),
                                          connection=connection)
                    if status != expected:
                        failures.append((env, number, method, status, data))
                        return
                status, _, data = req(tyl_server, 'GET', '/?env=' + env, connection=connection)
                if (status, data) != (200, state):
                    failures.append((env, number, 'GET', status, data[:200]))
                    return
                status, _, data = req(tyl_server, 'UNLOCK', '/unlock?env=' + env, body,
                                      terraform_headers(body), connection=connection)
                if status != 200:
                    failures.append((env, number, 'UNLOCK', status, data))
                    return
        except Exception as error:
            failures.append((env, 'exception', repr(error)))
        finally:
            connection.close()

    started = time.monotonic()
    threads = [threading.Thread(target=cycle, args=(w,)) for w in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads)
    print('\n%d x %d lock/write/read/unlock cycles: %.2f s'
          % (threads_count, cycles, time.monotonic() - started))
    assert not failures, failures[:5]
    for worker in range(threads_count):
        env = 'worker-%02d' % worker
        final = json.loads(get_state(tyl_server, env))
        assert (final['lineage'], final['serial']) == (env, cycles - 1)
        assert holder_of(tyl_server, env) is None


# Holds a write, after its state is stored and before it is answered, until
# the file $TYL_TEST_GATE/go exists: another process can write meanwhile.
GATED_POST_PROCESSOR = '''
import os
import time

from failing_pp import Failing


class Gated(Failing):
    def process_tfstate(self, tfstate_obj, **kwargs):
        gate = os.environ['TYL_TEST_GATE']
        open(os.path.join(gate, 'reached'), 'w').close()
        deadline = time.monotonic() + 20
        while not os.path.exists(os.path.join(gate, 'go')) and time.monotonic() < deadline:
            time.sleep(0.01)
'''


def test_get_after_another_process_replaced_the_state_during_a_write_has_its_md5(
        tyl_factory, tmp_path):
    """A server remembers the Content-MD5 of the state it wrote; the file
    it finds after the write may already be another process's."""
    write_plugin(tmp_path / 'plugins', 'failing_pp', FAILING_POST_PROCESSOR)
    plugins = write_plugin(tmp_path / 'plugins', 'gated_pp', GATED_POST_PROCESSOR)
    gate = tmp_path / 'gate'
    gate.mkdir()
    shared = str(tmp_path / 'shared-data')
    first = tyl_factory('first', FILE_DATA_PATH=shared, BACKEND_PLUGINS_PATH=plugins,
                        POST_PROCESS_CLASSES=['gated_pp.Gated'])
    first.env = {'TYL_TEST_GATE': str(gate)}
    first.start()
    second = tyl_factory('second', FILE_DATA_PATH=shared).start()
    answers = []
    writer = threading.Thread(target=lambda: answers.append(write(first, 'app', STATE)[0]))
    writer.start()
    deadline = time.monotonic() + 20
    while not (gate / 'reached').exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert write(second, 'app', STATE2)[0] == 200
    (gate / 'go').touch()
    writer.join(30)
    assert answers == [200]
    for server in (first, second):
        status, headers, data = req(server, 'GET', '/?env=app')
        assert (status, data) == (200, STATE2)
        assert headers['Content-MD5'] == md5_b64(STATE2)


# --------------------------------------------------------------------------
# Byte-exactness and size
# --------------------------------------------------------------------------

def test_state_comes_back_byte_for_byte(tyl_server):
    state = ('{ "serial" :7,"version":4,\t"lineage":"l",\r\n'
             '"big": 123456789012345678901234567890, "neg": -987654321098765432109876543210,\n'
             '"huge": 1e400, "negzero": -0.0, "tiny": 1E-400, "float": 1.10,\n'
             '"text": "emoji \U0001F600 and \u2028 line sep \u2029 and \\u2028 escaped \\ud83d\\ude00",\n'
             '"ctrl": "tab\\tquote\\"", "z": {"b": [ ], "a": {}},  "a": null  }   \n\n').encode('utf-8')
    assert lock(tyl_server, 'exact', ODD_LOCK)[0] == 200
    assert write(tyl_server, 'exact', state, ODD_ID)[0] == 200
    status, headers, data = req(tyl_server, 'GET', '/?env=exact')
    assert status == 200
    assert data == state
    assert headers['Content-MD5'] == md5_b64(state)
    with open(os.path.join(tyl_server.data_path, 'exact', 'terraform.tfstate'), 'rb') as stream:
        assert stream.read() == state


def test_30mb_state_round_trip(tyl_server):
    chunk = json.dumps({'type': 'null_resource', 'name': 'n', 'attributes': {
        'id': '1234567890', 'triggers': {'k': 'v' * 200, 'e': '\u00e9\U0001F600'}}}).encode()
    count = 30 * 1024 * 1024 // (len(chunk) + 1) + 1
    state = b'{"version":4,"serial":1,"lineage":"big","resources":[' + b','.join([chunk] * count) + b']}'
    assert len(state) >= 30 * 1024 * 1024
    assert lock(tyl_server, 'big', lock_info('BIG'))[0] == 200
    started = time.monotonic()
    status, _, _ = write(tyl_server, 'big', state, 'BIG')
    written = time.monotonic()
    assert status == 200
    status, headers, data = req(tyl_server, 'GET', '/?env=big')
    done = time.monotonic()
    assert status == 200
    assert len(data) == len(state) and data == state
    assert headers['Content-MD5'] == md5_b64(state)
    print('\n30 MB round trip (%d bytes): write %.2f s, read %.2f s, total %.2f s'
          % (len(state), written - started, done - written, done - started))


# --------------------------------------------------------------------------
# Durability, restart, permissions
# --------------------------------------------------------------------------

def test_lock_and_state_survive_restart_and_kill(tyl_server):
    assert lock(tyl_server, 'app', ODD_LOCK)[0] == 200
    assert write(tyl_server, 'app', STATE, ODD_ID)[0] == 200
    assert write(tyl_server, 'free', STATE2)[0] == 200

    assert tyl_server.restart() is tyl_server
    assert get_state(tyl_server, 'app') == STATE
    assert get_state(tyl_server, 'free') == STATE2
    assert write(tyl_server, 'app', STATE2)[:3:2] == (423, ODD_LOCK)
    assert holder_of(tyl_server, 'app') == ODD_LOCK

    assert write(tyl_server, 'app', STATE2, ODD_ID)[0] == 200
    tyl_server.kill()
    assert tyl_server.process.returncode != 0
    tyl_server.start()
    assert get_state(tyl_server, 'app') == STATE2
    assert lock(tyl_server, 'app', lock_info('intruder'))[:3:2] == (423, ODD_LOCK)
    assert lock(tyl_server, 'app', ODD_LOCK)[0] == 200
    assert unlock(tyl_server, 'app', ODD_LOCK)[0] == 200
    tyl_server.kill()
    tyl_server.start()
    assert holder_of(tyl_server, 'app') is None
    assert get_state(tyl_server, 'app') == STATE2


def test_data_directory_is_0700_and_files_0600(tyl_server):
    assert lock(tyl_server, 'app', lock_info('L1'))[0] == 200
    assert write(tyl_server, 'app', STATE, 'L1')[0] == 200
    assert write(tyl_server, 'other', STATE)[0] == 200
    assert data_files(tyl_server) == sorted([os.path.join('app', '.flock'),
                                             os.path.join('app', 'lock.json'),
                                             os.path.join('app', 'terraform.tfstate'),
                                             os.path.join('other', '.flock'),
                                             os.path.join('app', 'history', '1.json'),
                                             os.path.join('app', 'history', '1.tfstate'),
                                             os.path.join('other', 'terraform.tfstate'),
                                             os.path.join('other', 'history', '1.json'),
                                             os.path.join('other', 'history', '1.tfstate')])
    for directory, directories, files in os.walk(tyl_server.data_path):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700, directory
        for name in files:
            path = os.path.join(directory, name)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path


# --------------------------------------------------------------------------
# Access log, signals
# --------------------------------------------------------------------------

def test_access_log_has_one_line_per_request(tyl_server):
    before = len(access_lines(tyl_server))
    requests = [  # method, path, body, status, env field in the line
        ('GET', '/?env=app', None, 204, 'app'),
        ('LOCK', '/lock?env=app', lock_info('L1'), 200, 'app'),
        ('POST', '/?env=app&ID=L1', STATE, 200, 'app'),
        ('LOCK', '/lock?env=app', lock_info('L2'), 423, 'app'),
        ('POST', '/?env=app', STATE, 423, 'app'),
        ('GET', '/?env=app', None, 200, 'app'),
        ('UNLOCK', '/unlock?env=app', lock_info('L1'), 200, 'app'),
        ('DELETE', '/?env=app', None, 200, 'app'),
        ('GET', '/?env=../x', None, 400, None),
        ('GET', '/nowhere?env=app', None, 404, None),
        ('GET', '/lock?env=app', None, 405, None),
        ('FOO', '/?env=app', None, 405, None),
        ('GET', '/state', None, 200, None),
    ]
    for method, path, body, expected, _ in requests:
        headers = terraform_headers(body) if body is not None else {}
        assert req(tyl_server, method, path, body, headers)[0] == expected, (method, path)
    # One refused by the HTTP parser itself counts too.
    with RawConnection(tyl_server) as raw:
        many = b''.join(b'X-%d: y\r\n' % i for i in range(150))
        assert raw.exchange(b'GET /?env=app HTTP/1.1\r\n' + many + b'\r\n')[0] == 431
    expected_count = len(requests) + 1
    deadline = time.monotonic() + 5
    while len(access_lines(tyl_server)) < before + expected_count and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = access_lines(tyl_server)[before:]
    assert len(lines) == expected_count, '\n'.join(lines)
    # A line is written after its answer is sent, so two requests in quick
    # succession may log in either order: match lines to requests, not by position.
    unmatched = list(lines)
    for method, path, _, expected, env in requests:
        wanted = [' 127.0.0.1 "%s %s" ' % (method, path), ' status=%d ' % expected]
        if env:
            wanted.append(' env=%s ' % env)
        found = [line for line in unmatched if all(part in line for part in wanted)]
        assert found, (wanted, lines)
        unmatched.remove(found[0])
    assert len(unmatched) == 1 and ' status=431 ' in unmatched[0], unmatched


def test_newline_in_a_name_cannot_forge_a_log_line(tyl_server):
    forged = 'FORGED 127.0.0.1 "GET /?env=admin" env=admin status=200'
    encoded = forged.replace(' ', '%20').replace('"', '%22')
    for path in ('/?env=app%0a' + encoded, '/?env=app%0d%0a' + encoded, '/?env=app%0d' + encoded,
                 '/lock?env=app%0a' + encoded, '/nowhere%0a' + encoded,
                 '/?env=app&ID=x%0a' + encoded):
        for method in ('GET', 'LOCK', 'POST', 'FOO'):
            body = lock_info('x\n' + forged) if method == 'LOCK' else STATE
            status, _, _ = req(tyl_server, method, path, body, terraform_headers(body))
            assert status in (200, 204, 400, 404, 405, 409), (method, path, status)
    # A lock ID with a newline, accepted, then conflicting: its ID is logged too.
    assert lock(tyl_server, 'inj', lock_info('id\n' + forged))[0] == 200
    assert lock(tyl_server, 'inj', lock_info('other\r\n' + forged))[0] == 423
    # Raw CR and other control bytes in the request target.
    with RawConnection(tyl_server) as raw:
        raw.send(b'GET /?env=a\rFORGED HTTP/1.1\r\nHost: x\r\n\r\n')
        try:
            raw.response()
        except (http.client.HTTPException, OSError):
            pass
    time.sleep(0.2)
    for line in tyl_server.log().splitlines():
        assert not line.startswith('FORGED'), line
        assert not re.match(r'^\S+ \S+ INFO FORGED', line), line
        assert not re.match(r'^[\d\- :,]+INFO FORGED', line), line


def test_sigterm_exits_with_code_0(tyl_server):
    assert write(tyl_server, 'app', STATE)[0] == 200
    # An idle keep-alive connection must not hold the exit up.
    idle = tyl_server.connection()
    assert req(tyl_server, 'GET', '/?env=app', connection=idle)[0] == 200
    started = time.monotonic()
    assert tyl_server.stop() == 0
    assert time.monotonic() - started < 10
    idle.close()
    assert 'Traceback' not in tyl_server.log()
    tyl_server.start()
    assert get_state(tyl_server, 'app') == STATE
    assert tyl_server.stop() == 0


def test_expect_100_continue_is_answered_at_once_and_only_for_a_request_to_be_served(tyl_server):
    expect = [('Expect', '100-continue'), ('Content-Length', str(len(STATE)))]
    with RawConnection(tyl_server, timeout=5) as raw:
        raw.send(raw_request('POST', '/?env=app', headers=expect, length=False))
        # Before the body: without the 100 in this time, curl would wait a second.
        raw.sock.settimeout(0.5)
        assert raw.sock.recv(100) == b'HTTP/1.1 100 Continue\r\n\r\n'
        raw.sock.settimeout(5)
        raw.send(STATE)
        assert raw.response('POST')[0] == 200
    assert get_state(tyl_server, 'app') == STATE
    # Refused on its headers: the final answer at once, no 100, nothing read.
    too_big = [('Expect', '100-continue'), ('Content-Length', '10000000000')]
    for path, headers, status in (('/nowhere', expect, b'404'), ('/?env=../x', expect, b'400'),
                                  ('/?env=tyl-health-check', expect, b'400'),
                                  ('/lock', expect, b'400'), ('/?env=app', too_big, b'413')):
        with RawConnection(tyl_server, timeout=5) as raw:
            raw.send(raw_request('POST', path, headers=headers, length=False))
            answer = raw.sock.recv(4096)
            assert answer.startswith(b'HTTP/1.1 ' + status + b' '), (path, answer)
            assert b'\r\nConnection: close\r\n' in answer, (path, answer)
