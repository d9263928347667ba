"""pyshelve_backend on shelve files as PyTerraBackTYL wrote them.

PyTerraBackTYL kept each environment in `shelve.open(<data>/<env>_terraform_state)`
with the parsed state under TFSTATE ('' before the first write) and the
parsed lock under LOCK_STATE while held.  The shared behaviour of a store
is tested in test_backends.py; here: old files read, TYL's files read back
with plain `shelve`, and an interrupted commit is finished.
"""

import dbm
import importlib
import json
import os
import shelve
import subprocess
import sys

import pytest
import yaml

import tylserver

STATE = {
    'version': 3, 'serial': 7, 'lineage': 'b0e3-old', 'terraform_version': '0.11.11',
    'modules': [{'path': ['root'], 'outputs': {}, 'resources': {
        'null_resource.a': {'type': 'null_resource', 'primary': {'id': '42', 'attributes': {}}}}}],
}
LOCK = {'ID': 'aaaaaaaa-0000-0000-0000-000000000000', 'Operation': 'OperationTypeApply',
        'Info': '', 'Who': 'carol@old-host', 'Version': '0.11.11',
        'Created': '2019-01-02T03:04:05.000000006Z', 'Path': ''}
OTHER_LOCK = dict(LOCK, ID='bbbbbbbb-0000-0000-0000-000000000000', Who='dave@new-host')
NEW_STATE = {'version': 4, 'serial': 8, 'lineage': 'b0e3-old', 'terraform_version': '1.0.3',
             'outputs': {'greeting': {'value': 'h\u00e9llo \U0001F996', 'type': 'string'}},
             'resources': []}


def write_old_shelf(path, **values):
    """Write `values` as PyTerraBackTYL did: `shelve.open` with its defaults."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with shelve.open(path) as shelf:
        shelf.update(values)


def read_shelf(path):
    with shelve.open(path, 'r') as shelf:
        return dict(shelf)


def new_backend(workdir, environment='prod', **config):
    """A backend instance as the server builds it, on data directory `old`."""
    config = dict({'BACKEND_CLASS': 'pyshelve_backend.PyShelveBackend',
                   'PYSHELVE_DATA_PATH': 'old'}, **config)
    path = os.path.join(str(workdir), 'config.yaml')
    with open(path, 'w') as stream:
        yaml.safe_dump(config, stream)
    constants = tylserver.load_config(path, environ={})
    return tylserver.load_plugins(constants).backend_class(environment, constants)


def shelf_path(workdir, environment='prod'):
    return os.path.join(str(workdir), 'old', environment + '_terraform_state')


def test_old_shelf_reads_and_its_lock_holds(tmp_path):
    write_old_shelf(shelf_path(tmp_path), TFSTATE=STATE, LOCK_STATE=LOCK)
    backend = new_backend(tmp_path)
    assert backend.get_tfstate() == STATE
    assert backend.get_lock_state() == LOCK
    assert not backend.set_locked(OTHER_LOCK, raw=json.dumps(OTHER_LOCK))
    assert not backend.set_unlocked(OTHER_LOCK, raw=json.dumps(OTHER_LOCK))
    assert backend.set_unlocked(LOCK, raw=json.dumps(LOCK))
    assert backend.get_lock_state() == ''
    assert read_shelf(shelf_path(tmp_path)) == {'TFSTATE': STATE}


def test_old_empty_shelf_has_no_state(tmp_path):
    # PyTerraBackTYL stored '' on first use of an environment.
    write_old_shelf(shelf_path(tmp_path), TFSTATE='')
    backend = new_backend(tmp_path)
    assert backend.get_tfstate() == ''
    assert backend.get_lock_state() == ''


def test_tyl_writes_read_back_with_plain_shelve(tmp_path):
    backend = new_backend(tmp_path)
    backend.store_tfstate(NEW_STATE, raw=json.dumps(NEW_STATE))
    assert backend.set_locked(LOCK, raw=json.dumps(LOCK))
    assert read_shelf(shelf_path(tmp_path)) == {'TFSTATE': NEW_STATE, 'LOCK_STATE': LOCK}
    backend.delete_tfstate()
    assert backend.set_unlocked({}, raw='{}')
    assert read_shelf(shelf_path(tmp_path)) == {'TFSTATE': ''}


def test_other_keys_of_an_old_shelf_are_kept(tmp_path):
    write_old_shelf(shelf_path(tmp_path), TFSTATE=STATE, SOMETHING_ELSE=[1, 'two'])
    new_backend(tmp_path).store_tfstate(NEW_STATE, raw=json.dumps(NEW_STATE))
    assert read_shelf(shelf_path(tmp_path)) == {'TFSTATE': NEW_STATE, 'SOMETHING_ELSE': [1, 'two']}


def test_reading_an_unknown_environment_creates_nothing(tmp_path):
    backend = new_backend(tmp_path)
    assert backend.get_tfstate() == '' and backend.get_lock_state() == ''
    assert not backend.set_unlocked({}, raw='{}')
    backend.delete_tfstate()
    assert not os.path.exists(os.path.join(str(tmp_path), 'old'))


DBM_MODULES = ['dbm.sqlite3', 'dbm.gnu', 'dbm.ndbm', 'dbm.dumb']


@pytest.mark.parametrize('name', DBM_MODULES)
def test_a_shelf_keeps_its_dbm_format(tmp_path, name):
    try:
        module = importlib.import_module(name)
    except ImportError:
        pytest.skip('this Python has no %s' % name)
    path = shelf_path(tmp_path)
    os.makedirs(os.path.dirname(path))
    with shelve.Shelf(module.open(path, 'c')) as shelf:
        shelf.update(TFSTATE=STATE, LOCK_STATE=LOCK)
    backend = new_backend(tmp_path)
    assert backend.get_tfstate() == STATE
    assert backend.set_unlocked(LOCK, raw=json.dumps(LOCK))
    backend.store_tfstate(NEW_STATE, raw=json.dumps(NEW_STATE))
    assert dbm.whichdb(path) == name
    assert read_shelf(path) == {'TFSTATE': NEW_STATE}


def test_a_new_shelf_uses_the_default_dbm_and_only_expected_files(tmp_path):
    backend = new_backend(tmp_path)
    backend.store_tfstate(NEW_STATE, raw=json.dumps(NEW_STATE))
    path = shelf_path(tmp_path)
    reference = os.path.join(str(tmp_path), 'reference')
    with shelve.open(reference) as shelf:
        shelf['TFSTATE'] = ''
    assert dbm.whichdb(path) == dbm.whichdb(reference)
    names = os.listdir(os.path.dirname(path))
    assert 'prod_terraform_state.lock' in names
    assert not [name for name in names if 'tyl-' in name]


def test_an_interrupted_commit_is_finished_by_the_next_access(tmp_path, monkeypatch):
    path = shelf_path(tmp_path)
    write_old_shelf(path, TFSTATE=STATE)
    backend = new_backend(tmp_path)
    # Stop after the commit point: the new shelf sits in <file>.tyl-commit.
    monkeypatch.setattr(type(backend), '_finish_commit', lambda self: None)
    backend.store_tfstate(NEW_STATE, raw=json.dumps(NEW_STATE))
    monkeypatch.undo()
    commit_dir = path + '.tyl-commit'
    assert read_shelf(path) == {'TFSTATE': STATE}
    # And crash again with all but one of its files moved: dbm.dumb's new
    # .bak and .dat beside the old .dir, which must not be read as they are.
    for name in sorted(os.listdir(commit_dir))[:-1]:
        os.replace(os.path.join(commit_dir, name), os.path.join(os.path.dirname(path), name))
    assert new_backend(tmp_path).get_tfstate() == NEW_STATE
    assert not os.path.exists(commit_dir)
    assert read_shelf(path) == {'TFSTATE': NEW_STATE}


def test_a_crash_before_the_commit_leaves_the_old_shelf(tmp_path):
    path = shelf_path(tmp_path)
    write_old_shelf(path, TFSTATE=STATE)
    staging_dir = path + '.tyl-staging'
    os.mkdir(staging_dir)
    write_old_shelf(os.path.join(staging_dir, os.path.basename(path)), TFSTATE={'half': 'written'})
    backend = new_backend(tmp_path)
    assert backend.get_tfstate() == STATE
    assert backend.set_locked(LOCK, raw=json.dumps(LOCK))
    assert not os.path.exists(staging_dir)
    assert read_shelf(path) == {'TFSTATE': STATE, 'LOCK_STATE': LOCK}


def test_a_server_serves_an_old_shelf_and_writes_one_shelve_reads(tyl_factory):
    server = tyl_factory(BACKEND_CLASS='pyshelve_backend.PyShelveBackend',
                         PYSHELVE_DATA_PATH='pyterrabacktyl-data')
    path = os.path.join(server.workdir, 'pyterrabacktyl-data', 'prod_terraform_state')
    write_old_shelf(path, TFSTATE=STATE, LOCK_STATE=LOCK)
    server.start()

    status, _, body = server.request('GET', '/?env=prod')
    assert status == 200 and json.loads(body.decode('utf-8')) == STATE
    status, _, body = server.request('LOCK', '/lock?env=prod', body=json.dumps(OTHER_LOCK))
    assert status == 423 and json.loads(body.decode('utf-8'))['ID'] == LOCK['ID']
    status, _, _ = server.request('UNLOCK', '/unlock?env=prod', body=json.dumps(LOCK))
    assert status == 200

    status, _, _ = server.request('LOCK', '/lock?env=prod', body=json.dumps(OTHER_LOCK))
    assert status == 200
    assert read_shelf(path)['LOCK_STATE'] == OTHER_LOCK
    status, _, _ = server.request('POST', '/?env=prod&ID=' + OTHER_LOCK['ID'],
                                  body=json.dumps(NEW_STATE).encode('utf-8'))
    assert status == 200
    status, _, _ = server.request('UNLOCK', '/unlock?env=prod', body=json.dumps(OTHER_LOCK))
    assert status == 200
    assert server.stop() == 0
    assert read_shelf(path) == {'TFSTATE': NEW_STATE}


def test_a_stale_sqlite_log_is_not_replayed_over_the_new_shelf(tmp_path):
    # A dbm.sqlite3 shelf (Python 3.13+) whose writer died: its last value
    # is only in the -wal file.  Left beside the new shelf, SQLite would
    # replay it over what TYL wrote.
    pytest.importorskip('dbm.sqlite3')
    path = shelf_path(tmp_path)
    os.makedirs(os.path.dirname(path))
    dying_writer = ('import os, shelve, sys\n'
                    'shelf = shelve.open(sys.argv[1])\n'
                    'shelf["TFSTATE"] = {"serial": 1, "pad": "x" * 100000}\n'
                    'os._exit(0)\n')
    subprocess.run([sys.executable, '-c', dying_writer, path], check=True, timeout=60)
    assert os.path.getsize(path + '-wal') > 0
    backend = new_backend(tmp_path)
    assert backend.get_tfstate()['serial'] == 1
    backend.store_tfstate(NEW_STATE, raw=json.dumps(NEW_STATE))
    assert read_shelf(path) == {'TFSTATE': NEW_STATE}
