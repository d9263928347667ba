"""History over HTTP: GET /history, GET /?version=, POST /restore, and the
byte-level serial rewrite a restore makes.

The store side of history (retention, exact bytes, metadata) is in the
conformance suite, test_backends.py; here every backend that keeps one is
driven through a real server process.
"""

import hashlib
import json
import os
import re

import pytest

import tylserver
from test_http import STATE, get_state, lock, lock_info, md5_b64, req, unlock, write

HISTORY_BACKENDS = {
    'file': {},
    'aes': {'BACKEND_CLASS': 'aes_backend.AESBackend', 'AES_SECRET_KEY': 'B' * 43 + '='},
    'sqlite': {'BACKEND_CLASS': 'sqlite_backend.SQLiteBackend', 'SQLITE_DB_PATH': 'tyl.sqlite3'},
    'git': {'BACKEND_CLASS': 'git_backend.GitBackend', 'GIT_WORKING_PATH': 'tyl.git'},
}
NO_HISTORY = {'BACKEND_CLASS': 'pyshelve_backend.PyShelveBackend', 'PYSHELVE_DATA_PATH': 'shelves'}

CREATED = re.compile(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ')
STATES = [STATE.replace(b'"serial": 1', b'"serial": %d' % serial).replace(
    b'"outputs": {}', b'"outputs": {"n": {"value": %d, "type": "number"}}' % serial)
    for serial in (1, 2, 3)]


@pytest.fixture(params=sorted(HISTORY_BACKENDS))
def server(request, tyl_factory):
    if request.param == 'aes':
        pytest.importorskip('cryptography')
    return tyl_factory(**HISTORY_BACKENDS[request.param]).start()


def history(server, env='app'):
    status, headers, body = req(server, 'GET', '/history?env=' + env)
    assert status == 200, (status, body)
    assert headers['Content-Type'] == 'application/json'
    return json.loads(body.decode('utf-8'))


def get_version(server, version, env='app'):
    return req(server, 'GET', '/?env=%s&version=%s' % (env, version))


def restore(server, version, env='app'):
    return req(server, 'POST', '/restore?env=%s&version=%s' % (env, version))


def write_three_states(server):
    """STATES written: two under lock L1 of alice, the third without a lock."""
    holder = lock_info('L1', who='alice@ci-01')
    assert lock(server, 'app', holder)[0] == 200
    for state in STATES[:2]:
        assert write(server, 'app', state, 'L1')[0] == 200
    assert unlock(server, 'app', holder)[0] == 200
    assert write(server, 'app', STATES[2])[0] == 200


# --------------------------------------------------------------------------
# GET /history and GET /?version=
# --------------------------------------------------------------------------

def test_history_lists_every_write_newest_first_with_its_metadata(server):
    assert history(server) == []
    write_three_states(server)
    versions = history(server)
    assert [list(version) for version in versions] == [list(tylserver.VERSION_FIELDS)] * 3
    assert len({version['version'] for version in versions}) == 3
    for version, state in zip(versions, STATES[::-1]):
        assert isinstance(version['version'], str)
        assert CREATED.fullmatch(version['created'])
        assert (version['serial'], version['lineage']) == (json.loads(state)['serial'],
                                                           json.loads(state)['lineage'])
        assert (version['size'], version['sha256']) == (len(state), hashlib.sha256(state).hexdigest())
    assert [(version['lock_id'], version['who']) for version in versions] == [
        (None, None), ('L1', 'alice@ci-01'), ('L1', 'alice@ci-01')]


def test_odd_serials_and_lineages_are_listed_as_null_and_the_state_kept(server):
    # 1e400 parses as a float infinity, which JSON cannot carry.
    odd = (b'{"version": 4, "serial": 1e400, "lineage": 7}',
           b'{"version": 4, "serial": -3, "lineage": ["x"]}', b'{"version": 4, "serial": 2.5}')
    for state in odd:
        assert write(server, 'app', state)[0] == 200
        assert get_state(server, 'app') == state
    status, _, body = req(server, 'GET', '/history?env=app')
    assert status == 200
    listed = json.loads(body.decode('utf-8'), parse_constant=pytest.fail)
    assert [(version['serial'], version['lineage']) for version in listed] == [(None, None)] * 3


def test_a_version_reads_back_with_its_exact_bytes(server):
    write_three_states(server)
    for version, state in zip(history(server), STATES[::-1]):
        status, headers, body = get_version(server, version['version'])
        assert (status, body) == (200, state)
        assert headers['Content-MD5'] == md5_b64(state)
        assert headers['Content-Type'] == 'application/json'


@pytest.mark.parametrize('version', ['999', '0', '01', '', 'x', '..%2Fapp%2Fterraform.tfstate',
                                     '1%00', 'a' * 40, 'HEAD'])
def test_an_unknown_version_is_404(tyl_server, version):
    assert write(tyl_server, 'app', STATE)[0] == 200
    status, _, body = get_version(tyl_server, version)
    assert status == 404
    assert body.startswith(b'env app has no version ') and body.count(b'\n') == 1


def test_history_needs_a_valid_environment(tyl_server):
    assert req(tyl_server, 'GET', '/history')[:3:2] == (400, b'missing ?env=NAME\n')
    assert req(tyl_server, 'GET', '/history?env=..%2Fx')[0] == 400
    status, headers, _ = req(tyl_server, 'POST', '/history?env=app', b'')
    assert (status, headers['Allow']) == (405, 'GET')


def test_history_keep_limits_the_versions_over_http(tyl_factory):
    server = tyl_factory(HISTORY_KEEP=2).start()
    write_three_states(server)
    versions = history(server)
    assert [version['serial'] for version in versions] == [3, 2]
    assert get_version(server, '1')[0] == 404


def test_a_backend_without_history_answers_404(tyl_factory):
    server = tyl_factory(**NO_HISTORY).start()
    assert write(server, 'app', STATE)[0] == 200
    reason = b'no history: PyShelveBackend keeps none\n'
    assert req(server, 'GET', '/history?env=app')[:3:2] == (404, reason)
    assert get_version(server, '1')[:3:2] == (404, reason)
    assert restore(server, '1')[:3:2] == (404, reason)
    assert json.loads(get_state(server, 'app')) == json.loads(STATE)


def test_the_file_backend_writes_the_state_bytes_once(tyl_server):
    assert write(tyl_server, 'app', STATE)[0] == 200
    state = os.stat(os.path.join(tyl_server.data_path, 'app', 'terraform.tfstate'))
    version = os.stat(os.path.join(tyl_server.data_path, 'app', 'history', '1.tfstate'))
    assert (state.st_ino, state.st_nlink) == (version.st_ino, 2)


# --------------------------------------------------------------------------
# POST /restore
# --------------------------------------------------------------------------

def test_restore_stores_the_old_bytes_with_the_next_serial(server):
    write_three_states(server)
    oldest = history(server)[-1]
    status, _, body = restore(server, oldest['version'])
    assert status == 200, body
    restored = STATES[0].replace(b'"serial": 1', b'"serial": 4')
    assert json.loads(body.decode('utf-8')) == {'restored': oldest['version'], 'serial': 4,
                                                'sha256': hashlib.sha256(restored).hexdigest()}
    assert get_state(server, 'app') == restored
    newest = history(server)[0]
    assert (newest['serial'], newest['sha256']) == (4, hashlib.sha256(restored).hexdigest())
    assert newest['who'] == '127.0.0.1 via POST /restore' and newest['lock_id']
    assert lock(server, 'app', lock_info('after'))[0] == 200    # the restore's lock is gone


def test_restore_of_a_serial_too_large_to_write_one_above_is_409(tyl_server):
    huge = b'{"version": 4, "serial": ' + b'9' * 4300 + b', "lineage": "l"}'
    assert write(tyl_server, 'app', huge)[0] == 200
    version = history(tyl_server)[0]['version']
    status, _, body = req(tyl_server, 'POST', '/restore?env=app&version=' + version)
    assert (status, body) == (409, b'the serial of version %s is too large to go one above\n'
                              % version.encode())
    assert get_state(tyl_server, 'app') == huge


def test_restore_refuses_while_the_environment_is_locked(tyl_server):
    write_three_states(tyl_server)
    holder = lock_info('held-by-bob', who='bob@ci-02')
    assert lock(tyl_server, 'app', holder)[0] == 200
    status, _, body = restore(tyl_server, '1')
    assert status == 423
    assert body == (b'env app is locked by bob@ci-02 (lock held-by-bob, OperationTypeApply); '
                    b'nothing was changed\n')
    assert get_state(tyl_server, 'app') == STATES[2]
    assert len(history(tyl_server)) == 3
    assert lock(tyl_server, 'app', lock_info('intruder'))[0] == 423     # still bob's
    assert unlock(tyl_server, 'app', holder)[0] == 200


def test_restore_of_an_unknown_version_changes_nothing(tyl_server):
    write_three_states(tyl_server)
    assert restore(tyl_server, '9')[:3:2] == (404, b'env app has no version 9\n')
    assert req(tyl_server, 'POST', '/restore?env=app')[0] == 400
    assert get_state(tyl_server, 'app') == STATES[2]
    assert lock(tyl_server, 'app', lock_info('after'))[0] == 200


def test_restore_without_a_current_state_goes_above_the_versions_own_serial(tyl_server):
    assert write(tyl_server, 'app', STATES[1])[0] == 200
    assert req(tyl_server, 'DELETE', '/?env=app')[0] == 200
    assert restore(tyl_server, '1')[0] == 200
    assert get_state(tyl_server, 'app') == STATES[1].replace(b'"serial": 2', b'"serial": 3')


def replace_state_file(server, data, env='app'):
    """Put `data` in place of the state file, as a hand edit would: a new
    file, so that the version it was linked to keeps its bytes."""
    path = os.path.join(server.data_path, env, 'terraform.tfstate')
    os.unlink(path)
    with open(path, 'wb') as stream:
        stream.write(data)


def test_restore_repairs_a_state_edited_by_hand(tyl_server):
    write_three_states(tyl_server)
    replace_state_file(tyl_server, b'{"version": 4, "serial": 3, "lin')
    status, _, body = restore(tyl_server, '2')
    assert status == 200, body
    assert get_state(tyl_server, 'app') == STATES[1].replace(b'"serial": 2', b'"serial": 3')


# --------------------------------------------------------------------------
# with_serial: only the top-level "serial" value changes
# --------------------------------------------------------------------------

@pytest.mark.parametrize('before, after', [
    (b'{"serial":1}', b'{"serial":7}'),
    (b'{\n  "version": 4,\n  "serial": 12,\n  "lineage": "x"\n}\n',
     b'{\n  "version": 4,\n  "serial": 7,\n  "lineage": "x"\n}\n'),
    (b' \r\n{ "serial" :\t123456789012345678901234567890 , "a":1}  ',
     b' \r\n{ "serial" :\t7 , "a":1}  '),
    # nested "serial"s and lookalike strings stay; an escaped key is the key
    (b'{"outputs":{"serial":{"value":1}},"x":["serial",{"serial":2}],"s":"\\"serial\\": 3",'
     b'"ser\\u0069al":4}',
     b'{"outputs":{"serial":{"value":1}},"x":["serial",{"serial":2}],"s":"\\"serial\\": 3",'
     b'"ser\\u0069al":7}'),
    # a key given twice: both, since a reader takes the last
    (b'{"serial":1,"serial":2}', b'{"serial":7,"serial":7}'),
    # other bytes, however unusual, are kept
    ('{"a":"caf\u00e9 \\ud83e\\udd96 \U0001F996","serial":3e0,"b":-0.0,"c":1E400}'.encode('utf-8'),
     '{"a":"caf\u00e9 \\ud83e\\udd96 \U0001F996","serial":7,"b":-0.0,"c":1E400}'.encode('utf-8')),
    (b'{}', b'{}'),
])
def test_with_serial_replaces_only_the_top_level_serial(before, after):
    assert tylserver.with_serial(before, 7) == after
