"""The admin commands, run as `tylserver.py --config ... COMMAND` processes:
history, restore, export, import, and migrate, here from PyTerraBackTYL's
shelve files to the file and SQLite backends."""

import json
import os
import pty
import subprocess
import sys

import pytest

from conftest import TYLSERVER
from test_http import STATE, get_state, lock, lock_info, unlock, write
from test_pyshelve_backend import LOCK, NEW_STATE, STATE as OLD_STATE, write_old_shelf

STATE2 = STATE.replace(b'"serial": 1', b'"serial": 2').replace(
    b'"outputs": {}', b'"outputs": {"x": {"value": "\\u00e9", "type": "string"}}')
TIMEOUT = 60


def run(server, *args, input=None, stderr=subprocess.PIPE):
    """`tylserver.py --config <server's config> *args`, finished."""
    environ = {name: value for name, value in os.environ.items() if not name.startswith('TYL_')}
    return subprocess.run([sys.executable, TYLSERVER, '--config', server.config_path] + list(args),
                          input=input, stdout=subprocess.PIPE, stderr=stderr, env=environ,
                          timeout=TIMEOUT)


def configured(tyl_factory, name='server', **config):
    """A server's directory and config file, for commands; not started."""
    server = tyl_factory(name, **config)
    server.start().stop()
    return server


def write_file(server, name, data):
    path = os.path.join(server.workdir, name)
    with open(path, 'wb') as stream:
        stream.write(data)
    return path


# --------------------------------------------------------------------------
# history, restore, export, import
# --------------------------------------------------------------------------

def test_import_history_restore_export(tyl_factory):
    server = configured(tyl_factory)
    for data in (STATE, STATE2):
        done = run(server, 'import', 'app', write_file(server, 'in.tfstate', data))
        assert done.returncode == 0, done.stderr
    assert run(server, 'export', 'app').stdout == STATE2

    done = run(server, 'history', 'app', '--json')
    versions = json.loads(done.stdout.decode('utf-8'))
    assert [(v['version'], v['serial'], v['size']) for v in versions] == [
        ('2', 2, len(STATE2)), ('1', 1, len(STATE))]
    assert versions[0]['who'].endswith(' via tylserver') and versions[0]['lock_id']
    table = run(server, 'history', 'app').stdout.decode('utf-8').splitlines()
    assert table[0].split() == ['VERSION', 'SERIAL', 'CREATED', 'SIZE', 'SHA256', 'WHO', 'LOCK', 'ID']
    assert [line.split()[:2] for line in table[1:]] == [['2', '2'], ['1', '1']]

    done = run(server, 'restore', 'app', '1')
    assert (done.returncode, done.stdout) == (0, b'restored version 1 of env app as serial 3\n')
    assert run(server, 'export', 'app').stdout == STATE.replace(b'"serial": 1', b'"serial": 3')
    assert run(server, 'export', 'app', '--version', '2').stdout == STATE2
    assert len(json.loads(run(server, 'history', 'app', '--json').stdout.decode('utf-8'))) == 3


def test_import_from_standard_input(tyl_factory):
    server = configured(tyl_factory)
    done = run(server, 'import', 'app', '-', input=STATE)
    assert done.returncode == 0, done.stderr
    assert run(server, 'export', 'app').stdout == STATE


@pytest.mark.parametrize('args, message', [
    (['export', 'app'], 'tylserver: env app has no state\n'),
    (['export', 'app', '--version', '7'], 'tylserver: env app has no version 7\n'),
    (['restore', 'app', '7'], 'tylserver: env app has no version 7\n'),
    (['import', 'app', 'missing.tfstate'], "tylserver: [Errno 2] No such file or directory: "
                                           "'missing.tfstate'\n"),
    (['import', 'app', '-'], 'tylserver: state is not valid JSON: Expecting value: '
                             'line 1 column 1 (char 0)\n'),
])
def test_a_refused_command_is_one_line_and_exit_status_1(tyl_factory, args, message):
    server = configured(tyl_factory)
    done = run(server, *args, input=b'not json')
    assert (done.returncode, done.stdout, done.stderr.decode('utf-8')) == (1, b'', message)


def test_a_bad_environment_name_is_a_usage_error(tyl_factory):
    done = run(configured(tyl_factory), 'history', '../x')
    assert done.returncode == 2 and b'bad environment name' in done.stderr


def test_commands_beside_a_running_server_respect_its_lock(tyl_server):
    assert write(tyl_server, 'app', STATE)[0] == 200
    assert write(tyl_server, 'app', STATE2)[0] == 200
    holder = lock_info('bobs-lock', who='bob@ci')
    assert lock(tyl_server, 'app', holder)[0] == 200
    for args in (['restore', 'app', '1'], ['import', 'app', '-']):
        done = run(tyl_server, *args, input=STATE)
        assert done.returncode == 1
        assert done.stderr == (b'tylserver: env app is locked by bob@ci (lock bobs-lock, '
                               b'OperationTypeApply); nothing was changed\n')
    assert get_state(tyl_server, 'app') == STATE2
    assert unlock(tyl_server, 'app', holder)[0] == 200

    assert run(tyl_server, 'restore', 'app', '1').returncode == 0
    assert get_state(tyl_server, 'app') == STATE.replace(b'"serial": 1', b'"serial": 3')
    assert lock(tyl_server, 'app', holder)[0] == 200     # the command's lock is gone


def test_history_of_a_backend_without_one_is_refused(tyl_factory):
    server = configured(tyl_factory, BACKEND_CLASS='pyshelve_backend.PyShelveBackend')
    done = run(server, 'history', 'app')
    assert (done.returncode, done.stderr) == (1, b'tylserver: no history: PyShelveBackend keeps none\n')


# --------------------------------------------------------------------------
# migrate
# --------------------------------------------------------------------------

SHELVE = {'BACKEND_CLASS': 'pyshelve_backend.PyShelveBackend', 'PYSHELVE_DATA_PATH': 'old'}
TARGETS = {
    'file': {'BACKEND_CLASS': 'file_backend.FileBackend', 'FILE_DATA_PATH': 'new'},
    'sqlite': {'BACKEND_CLASS': 'sqlite_backend.SQLiteBackend', 'SQLITE_DB_PATH': 'new.sqlite3'},
}
OLD_ENVIRONMENTS = {
    'legacy': {'TFSTATE': OLD_STATE},
    'locked.prod': {'TFSTATE': NEW_STATE, 'LOCK_STATE': LOCK},
    'empty': {'TFSTATE': ''},
}


def pyterrabacktyl_data(server):
    """PyTerraBackTYL's data directory in `server`'s, written as it wrote it."""
    for env, values in OLD_ENVIRONMENTS.items():
        write_old_shelf(os.path.join(server.workdir, 'old', env + '_terraform_state'), **values)


def served(server, envs):
    """{env: (GET status, body)} from `server`, started and stopped again."""
    server.start()
    try:
        return {env: server.request('GET', '/?env=' + env)[::2] for env in envs}
    finally:
        server.stop()


@pytest.mark.parametrize('target', sorted(TARGETS))
def test_migrate_pyterrabacktyl_shelves_byte_for_byte(tyl_factory, target):
    source = tyl_factory('source', **SHELVE)
    pyterrabacktyl_data(source)
    before = served(source, OLD_ENVIRONMENTS)
    assert before['empty'] == (204, b'') and before['legacy'][0] == before['locked.prod'][0] == 200
    destination = configured(tyl_factory, 'target', **TARGETS[target])

    done = run(source, 'migrate', '--to', TARGETS[target]['BACKEND_CLASS'],
               '--config', destination.config_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == b''   # piped: no progress
    assert done.stdout == ('migrated 3 environments (0 versions) from '
                           'pyshelve_backend.PyShelveBackend to %s; 0 there already, 0 failed\n'
                           % TARGETS[target]['BACKEND_CLASS']).encode('ascii')

    assert served(destination, OLD_ENVIRONMENTS) == before
    destination.start()
    status, _, holder = destination.request('LOCK', '/lock?env=locked.prod',
                                            body=lock_info('newcomer'))
    assert status == 423 and json.loads(holder.decode('utf-8')) == LOCK
    versions = json.loads(destination.request('GET', '/history?env=legacy')[2].decode('utf-8'))
    assert [(v['serial'], v['lineage'], v['who']) for v in versions] == [(7, 'b0e3-old', None)]
    destination.stop()

    again = run(source, 'migrate', '--to', TARGETS[target]['BACKEND_CLASS'],
                '--config', destination.config_path)
    assert again.returncode == 0, again.stderr
    # Run again: the two with something stored are there already; the
    # empty one has nothing to copy, so it is copied again.
    assert b'migrated 1 environments (0 versions)' in again.stdout
    assert b'2 there already, 0 failed' in again.stdout


def test_migrate_copies_the_history_with_its_metadata(tyl_factory):
    source = tyl_factory('source').start()
    holder = lock_info('L1', who='alice@ci')
    assert lock(source, 'app', holder)[0] == 200
    assert write(source, 'app', STATE, 'L1')[0] == 200
    assert unlock(source, 'app', holder)[0] == 200
    assert write(source, 'app', STATE2)[0] == 200
    assert write(source, 'gone', STATE)[0] == 200
    assert source.request('DELETE', '/?env=gone')[0] == 200
    history = {env: json.loads(source.request('GET', '/history?env=' + env)[2].decode('utf-8'))
               for env in ('app', 'gone')}
    source.stop()
    destination = configured(tyl_factory, 'target', **TARGETS['sqlite'])

    done = run(source, 'migrate', '--config', destination.config_path)
    assert done.returncode == 0, done.stderr
    assert b'migrated 2 environments (3 versions)' in done.stdout

    destination.start()
    for env, versions in history.items():
        copied = json.loads(destination.request('GET', '/history?env=' + env)[2].decode('utf-8'))
        assert [dict(v, version=None) for v in copied] == [dict(v, version=None) for v in versions]
        for version in copied:
            status, _, body = destination.request('GET', '/?env=%s&version=%s' % (env, version['version']))
            assert status == 200 and len(body) == version['size']
    assert get_state(destination, 'app') == STATE2
    assert get_state(destination, 'gone') is None     # deleted after its last version


def test_migrate_leaves_an_environment_the_target_holds_otherwise(tyl_factory):
    source = tyl_factory('source').start()
    for env in ('a', 'b'):
        assert write(source, env, STATE)[0] == 200
    source.stop()
    destination = tyl_factory('target', **TARGETS['file']).start()
    assert write(destination, 'b', STATE2)[0] == 200
    destination.stop()

    done = run(source, 'migrate', '--config', destination.config_path)
    assert done.returncode == 1
    assert done.stderr == (b'tylserver: env b: env b already holds another state or a lock here; '
                           b'nothing was copied\n')
    assert b'migrated 1 environments (1 versions)' in done.stdout and b'1 failed' in done.stdout
    destination.start()
    assert (get_state(destination, 'a'), get_state(destination, 'b')) == (STATE, STATE2)


def test_migrate_to_itself_is_refused(tyl_factory):
    done = run(configured(tyl_factory), 'migrate', '--to', 'file_backend.FileBackend')
    assert done.returncode == 2 and b'migrate needs a target other than the source' in done.stderr


def test_migrate_shows_progress_on_a_terminal(tyl_factory):
    source = tyl_factory('source', **SHELVE)
    pyterrabacktyl_data(source)
    source.start().stop()       # writes its config file
    destination = configured(tyl_factory, 'target', **TARGETS['file'])
    terminal, attached = pty.openpty()
    try:
        done = run(source, 'migrate', '--config', destination.config_path, stderr=attached)
        os.close(attached)
        attached = None
        shown = b''
        for _ in range(100):
            try:
                chunk = os.read(terminal, 65536)
            except OSError:         # EIO: the other end is closed and drained
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(terminal)
        if attached is not None:
            os.close(attached)
    assert done.returncode == 0
    assert shown.replace(b'\r\n', b'\n') == (b'[1/3] empty: 0 versions\n[2/3] legacy: 0 versions\n'
                                            b'[3/3] locked.prod: 0 versions\n')
