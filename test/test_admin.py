"""The administration commands `envs`, `show` and `unlock`, run as
`tylserver.py --config ... COMMAND` processes, and the AUDIT_LOG lines of
HTTP requests and commands."""

import base64
import getpass
import hashlib
import json
import os
import re
import subprocess
import sys

import tylserver
from conftest import TYLSERVER
from test_history import replace_state_file
from test_history_cli import STATE2, configured, run, write_file
from test_http import STATE, lock, lock_info, unlock, write

AUDIT = {'AUDIT_LOG': 'audit.jsonl'}


def audit_lines(server):
    with open(os.path.join(server.workdir, 'audit.jsonl'), 'rb') as stream:
        return [json.loads(line.decode('utf-8')) for line in stream.read().splitlines()]


def summary(line):
    return (line['client'], line['user'], line['env'], line['action'], line['lock_id'],
            line['who'], line['serial'], line['sha256'], line['status'])


# --------------------------------------------------------------------------
# envs, show, unlock
# --------------------------------------------------------------------------

def test_envs_lists_lock_serial_size_and_last_write(tyl_factory):
    server = tyl_factory().start()
    assert write(server, 'app', STATE)[0] == 200
    assert write(server, 'db', STATE2)[0] == 200
    assert lock(server, 'db', lock_info('L1', who='bob@ci'))[0] == 200
    assert lock(server, 'empty', lock_info('L2', who='carol@ci'))[0] == 200
    assert lock(server, 'nowho', b'{"ID": "L3"}')[0] == 200
    server.stop()

    done = run(server, 'envs')
    assert (done.returncode, done.stderr) == (0, b'')
    rows = [line.split() for line in done.stdout.decode('utf-8').splitlines()]
    assert rows[0] == ['ENV', 'LOCKED', 'BY', 'SINCE', 'SERIAL', 'SIZE', 'LAST', 'WRITE']
    assert [row[:5] for row in rows[1:]] == [
        ['app', '-', '-', '1', str(len(STATE))],
        ['db', 'bob@ci', '2026-08-21T10:11:12.123456789Z', '2', str(len(STATE2))],
        ['empty', 'carol@ci', '2026-08-21T10:11:12.123456789Z', '-', '-'],
        ['nowho', '?', '(ID', 'L3)', '-']]
    assert rows[1][5].endswith('Z') and rows[3][5] == '-'


def test_envs_lists_the_others_when_one_cannot_be_read(tyl_factory):
    server = tyl_factory().start()
    for env in ('app', 'bad', 'db'):
        assert write(server, env, STATE)[0] == 200
    server.stop()
    replace_state_file(server, b'{"version": 4, "serial": 3, "lin', env='bad')
    done = run(server, 'envs')
    assert done.returncode == 1
    assert [line.split()[0] for line in done.stdout.decode('utf-8').splitlines()] == ['ENV', 'app', 'db']
    assert done.stderr.startswith(b'tylserver: env bad: StoredDataError: stored state is not valid JSON: ')
    assert done.stderr.count(b'\n') == 1


def test_history_with_metadata_edited_by_hand_is_one_line(tyl_factory):
    server = tyl_factory().start()
    assert write(server, 'app', STATE)[0] == 200
    server.stop()
    with open(os.path.join(server.data_path, 'app', 'history', '1.json'), 'wb') as stream:
        stream.write(b'{"serial": 1, "lin')
    done = run(server, 'history', 'app')
    assert (done.returncode, done.stdout) == (1, b'')
    assert re.fullmatch(rb'tylserver: ValueError: \S+/app/history/1\.json: Unterminated string[^\n]*\n',
                        done.stderr), done.stderr


def test_envs_without_list_environments_is_one_line_and_exit_1(tyl_factory):
    server = configured(tyl_factory, BACKEND_CLASS='TEMPLATE_backend.TemplateBackend')
    done = run(server, 'envs')
    assert (done.returncode, done.stdout) == (1, b'')
    assert done.stderr == b'tylserver: BACKEND_CLASS TEMPLATE_backend.TemplateBackend cannot ' \
                          b'list its environments\n'


def test_show_prints_the_lock_and_the_top_level_fields(tyl_factory):
    server = configured(tyl_factory)
    assert run(server, 'show', 'app').stdout == b'lock: none\nstate: none\n'
    state = STATE2.replace(b'"resources": []', b'"resources": [{"type": "a", "name": "x", '
                           b'"instances": [{}, {}]}, {"type": "b", "name": "y", "instances": [{}]}]')
    assert run(server, 'import', 'app', write_file(server, 'in.tfstate', state)).returncode == 0
    server.start()
    assert lock(server, 'app', lock_info('L1'))[0] == 200
    server.stop()
    done = run(server, 'show', 'app')
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode('utf-8') == (
        'lock: %s\nversion: 4\nterraform_version: 1.0.3\nserial: 2\n'
        'lineage: 3f0b9c8e-1111-2222-3333-444455556666\nresource instances: 3\n'
        % lock_info('L1').decode('utf-8'))
    version3 = b'{"version": 3, "serial": 7, "modules": [{"path": ["root"], "resources": ' \
               b'{"null_resource.a": {}, "null_resource.b": {}}}]}'
    assert run(server, 'import', 'old', write_file(server, 'v3.tfstate', version3)).returncode == 0
    assert run(server, 'show', 'old').stdout.decode('utf-8').splitlines()[1:] == [
        'version: 3', 'terraform_version: -', 'serial: 7', 'lineage: -', 'resource instances: 2']


def test_a_reader_that_stops_reading_ends_a_command_quietly(tyl_factory):
    server = configured(tyl_factory)
    assert run(server, 'import', 'app', write_file(server, 'in.tfstate', STATE2)).returncode == 0
    for command in (['envs'], ['show', 'app'], ['history', 'app'], ['export', 'app']):
        reader, writer = os.pipe()
        os.close(reader)        # as `| head -0` does
        try:
            done = subprocess.run([sys.executable, TYLSERVER, '--config', server.config_path]
                                  + command, stdout=writer, stderr=subprocess.PIPE, timeout=60)
        finally:
            os.close(writer)
        assert (done.returncode, done.stderr) == (141, b''), command


def test_unlock_with_the_wrong_id_names_the_holder(tyl_factory):
    server = tyl_factory(**AUDIT).start()
    assert lock(server, 'app', lock_info('L1', who='bob@ci'))[0] == 200
    done = run(server, 'unlock', 'app', '--id', 'other')
    assert done.returncode == 1 and done.stdout == b''
    assert done.stderr == b'tylserver: env app is locked by bob@ci with lock L1, not other; ' \
                          b'nothing was changed\n'
    done = run(server, 'unlock', 'app', '--id', 'L1')
    assert (done.returncode, done.stdout) == (0, b'env app is unlocked\n')
    assert lock(server, 'app', lock_info('L2'))[0] == 200
    done = run(server, 'unlock', 'app')
    assert (done.returncode, done.stdout) == (
        0, b'env app is unlocked: lock L2 of alice@ci-01 released by force\n')
    assert lock(server, 'app', lock_info('L3'))[0] == 200     # released by force

    user = getpass.getuser()
    lines = [summary(line) for line in audit_lines(server) if line['client'] == 'cli']
    assert [line[:5] + line[6:] for line in lines] == [
        ('cli', user, 'app', 'unlock', 'other', None, None, 409),
        ('cli', user, 'app', 'unlock', 'L1', None, None, 200),
        ('cli', user, 'app', 'force-unlock', 'L2', None, None, 200)]
    assert lines[0][5].endswith(' via tylserver') and lines[2][5] == 'alice@ci-01'


def test_unlock_by_force_respects_force_unlock_false(tyl_factory):
    server = tyl_factory(FORCE_UNLOCK=False, **AUDIT).start()
    assert lock(server, 'app', lock_info('L1'))[0] == 200
    done = run(server, 'unlock', 'app')
    assert done.returncode == 1
    assert done.stderr == b'tylserver: force-unlock is disabled on this server (FORCE_UNLOCK: false)\n'
    assert [line['status'] for line in audit_lines(server)][-1] == 403


# --------------------------------------------------------------------------
# AUDIT_LOG of HTTP requests
# --------------------------------------------------------------------------

def http_changes(server):
    assert lock(server, 'app', lock_info('L1', who='bob\n{"forged": 1}'))[0] == 200
    assert write(server, 'app', STATE, 'L1')[0] == 200
    assert write(server, 'app', STATE2, 'wrong')[0] == 423
    assert unlock(server, 'app', lock_info('L1'))[0] == 200
    assert lock(server, 'app', lock_info('L2'))[0] == 200
    assert unlock(server, 'app', b'')[0] == 200
    assert server.request('DELETE', '/?env=app')[0] == 200
    assert server.request('GET', '/?env=app')[0] == 204     # reads are not audited


def test_audit_lines_of_http_changes_without_auth(tyl_factory):
    server = tyl_factory(**AUDIT).start()
    http_changes(server)
    sha256 = hashlib.sha256(STATE).hexdigest()
    assert [summary(line) for line in audit_lines(server)] == [
        ('127.0.0.1', None, 'app', 'lock', 'L1', 'bob\n{"forged": 1}', None, None, 200),
        ('127.0.0.1', None, 'app', 'write', 'L1', None, 1, sha256, 200),
        ('127.0.0.1', None, 'app', 'write', 'wrong', None, None, None, 423),
        ('127.0.0.1', None, 'app', 'unlock', 'L1', 'alice@ci-01', None, None, 200),
        ('127.0.0.1', None, 'app', 'lock', 'L2', 'alice@ci-01', None, None, 200),
        ('127.0.0.1', None, 'app', 'force-unlock', 'L2', 'alice@ci-01', None, None, 200),
        ('127.0.0.1', None, 'app', 'delete', None, None, None, None, 200)]
    assert all(line['time'].endswith('Z') for line in audit_lines(server))


def test_audit_lines_name_the_authenticated_user(tyl_factory):
    server = tyl_factory(AUTH_USERS={'alice': tylserver.hash_password('secret')},
                         AUTH_ADMINS=['alice'], **AUDIT)
    server.default_headers = {'Authorization': 'Basic ' + base64.b64encode(b'alice:secret').decode()}
    server.start()
    http_changes(server)
    server.default_headers = {'Authorization': 'Basic ' + base64.b64encode(b'alice:wrong').decode()}
    assert write(server, 'app', STATE)[0] == 401
    lines = audit_lines(server)
    assert [line['user'] for line in lines] == ['alice'] * 7 + [None]
    assert (lines[-1]['action'], lines[-1]['status'], lines[-1]['serial']) == ('write', 401, None)


def test_audit_lines_of_commands(tyl_factory):
    server = configured(tyl_factory, **AUDIT)
    assert run(server, 'import', 'app', write_file(server, 'in.tfstate', STATE)).returncode == 0
    assert run(server, 'import', 'app', write_file(server, 'in.tfstate', STATE2)).returncode == 0
    assert run(server, 'restore', 'app', '1').returncode == 0
    restored = run(server, 'export', 'app').stdout
    lines = audit_lines(server)
    assert [(line['action'], line['serial'], line['sha256'], line['status']) for line in lines] == [
        ('write', 1, hashlib.sha256(STATE).hexdigest(), 200),
        ('write', 2, hashlib.sha256(STATE2).hexdigest(), 200),
        ('restore', 3, hashlib.sha256(restored).hexdigest(), 200)]
    assert {(line['client'], line['user']) for line in lines} == {('cli', getpass.getuser())}
