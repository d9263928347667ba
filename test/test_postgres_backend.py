"""What postgres_backend adds to the conformance suite (test_backends.py,
which runs on it too): the write's lock check inside its transaction,
timeouts that end a request instead of hanging it, the schema's version,
and one start-up line when psycopg is missing.

The database is the session's throwaway cluster (postgres_cluster.py).
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

import postgres_cluster
from conftest import TYLSERVER
from test_backends import (BACKENDS, L1, L2, SMALL_STATE, TRICKY_STATE, Store, lock, server_arguments,
                           store_state)
from tylstore import BackendUnavailable

POSTGRES = [backend for backend in BACKENDS if backend.name == 'postgres'][0]
L1_ID, L2_ID = '11111111-1111-1111-1111-111111111111', '22222222-2222-2222-2222-222222222222'


@pytest.fixture
def store(tmp_path):
    return Store(POSTGRES, str(tmp_path))


def store_under(instance, body, holder_id):
    """store_tfstate as the server calls it after finding `holder_id` held."""
    obj, kwargs = server_arguments(instance, body)
    return instance.store_tfstate(obj, holder_id=holder_id, **kwargs)


def admin_in_schema(store):
    """A superuser connection to the store's schema, in a transaction."""
    db = postgres_cluster.shared().admin('tyl')
    db.execute('SET search_path = %s' % store.constants.POSTGRES_DSN.split('search_path=')[1])
    return db


def unavailable(call, within):
    """Run `call`, which must raise BackendUnavailable within `within`
    seconds; return the error's message and the seconds it took."""
    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as error:
        call()
    took = time.monotonic() - started
    assert took < within, took
    return str(error.value), took


def test_a_write_stores_only_under_the_lock_the_server_saw(store):
    one, two = store.new(), store.new()
    store_under(one, SMALL_STATE, '')
    assert lock(two, L2)
    for stale in ('', L1_ID):
        reason, _ = unavailable(lambda: store_under(one, TRICKY_STATE, stale), 5)
        assert 'lock of env env changed' in reason and 'nothing was stored' in reason
    assert one.get_tfstate() == SMALL_STATE
    assert len(one.list_versions()) == 1
    store_under(one, TRICKY_STATE, L2_ID)
    assert two.get_tfstate() == TRICKY_STATE


def test_an_unlock_waits_for_the_write_under_way(store):
    """The write's transaction holds the lock row FOR SHARE: an unlock
    through another server commits after it, never in the middle."""
    instance = store.new()
    assert lock(instance, L1)
    with admin_in_schema(store) as db, db.transaction():
        db.execute("SELECT 1 FROM tflock WHERE environment = 'env' FOR SHARE")
        unlocked = []
        unlocker = threading.Thread(target=lambda: unlocked.append(store.new().set_unlocked({})))
        unlocker.start()
        unlocker.join(1)
        assert unlocker.is_alive() and not unlocked
    unlocker.join(30)
    assert unlocked == [True]


def test_a_lock_waits_for_a_write_under_way_that_saw_no_lock(store):
    """With no lock row to hold, the write holds the environment's advisory
    lock: a LOCK through another server commits after it, so the write
    never lands under a lock taken meanwhile."""
    with admin_in_schema(store) as db, db.transaction():
        db.execute('SELECT pg_advisory_xact_lock(%s, hashtext(%s))',
                   (sys.modules[store.cls.__module__].ENVIRONMENT_LOCKS, 'env'))
        locked = []
        locker = threading.Thread(target=lambda: locked.append(lock(store.new(), L1)))
        locker.start()
        locker.join(1)
        assert locker.is_alive() and not locked
    locker.join(30)
    assert locked == [True]


def test_a_blocked_row_ends_at_the_statement_timeout(tmp_path):
    blocked = Store(POSTGRES, str(tmp_path), POSTGRES_STATEMENT_TIMEOUT=1)
    instance = blocked.new()
    assert lock(instance, L1)
    with admin_in_schema(blocked) as db, db.transaction():
        db.execute("SELECT 1 FROM tflock WHERE environment = 'env' FOR UPDATE")
        reason, took = unavailable(lambda: store_under(instance, SMALL_STATE, L1_ID), 5)
        assert took >= 0.9
        assert 'canceling statement due to statement timeout' in reason, reason
    store_under(instance, SMALL_STATE, L1_ID)
    assert instance.get_tfstate() == SMALL_STATE


def test_a_silent_database_ends_at_the_connect_timeout(tmp_path):
    """A server that accepts connections and never answers (a host gone
    half-dead) costs each request POSTGRES_CONNECT_TIMEOUT, then a 503,
    however many wait for it at once."""
    postgres_cluster.shared()
    results = {}
    with socket.create_server(('127.0.0.1', 0)) as silent:
        port = silent.getsockname()[1]
        dsn = 'host=127.0.0.1 port=%d dbname=tyl user=tyl' % port
        store = Store(POSTGRES, str(tmp_path), POSTGRES_DSN=dsn, POSTGRES_CONNECT_TIMEOUT=2)
        instances = [store.new('env-%d' % number) for number in range(4)]
        threads = [threading.Thread(target=lambda i=i: results.update({i: unavailable(i.get_tfstate, 5)}))
                   for i in instances]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert len(results) == len(instances)
    for reason, took in results.values():
        assert took >= 1.9
        assert reason.startswith('PostgreSQL 127.0.0.1:%d/tyl unavailable: ' % port)
        assert 'timeout expired' in reason, reason


def test_a_wrong_password_is_a_503_naming_it(tmp_path):
    wrong = tmp_path / 'wrong.password'
    wrong.write_text('not-the-password\n')
    store = Store(POSTGRES, str(tmp_path), POSTGRES_PASSWORD_FILE=str(wrong))
    reason, _ = unavailable(store.new().get_tfstate, 5)
    assert 'password authentication failed for user "tyl"' in reason, reason
    assert 'not-the-password' not in reason


def test_without_a_dsn_the_error_names_the_key(tmp_path):
    postgres_cluster.shared()
    with pytest.raises(ValueError, match='postgres_backend needs POSTGRES_DSN'):
        Store(POSTGRES, str(tmp_path), POSTGRES_DSN=None).new()


def test_the_schema_is_versioned_and_a_newer_one_refused(store):
    import postgres_backend
    store_state(store.new(), SMALL_STATE)
    with admin_in_schema(store) as db:
        assert db.execute('SELECT version FROM schema_version').fetchall() == [
            (len(postgres_backend.MIGRATIONS),)]
        db.execute('UPDATE schema_version SET version = 99')
    # Another server starting on this database (its own pool size: its own pool).
    other = Store(POSTGRES, os.path.join(store.workdir, 'other'),
                  POSTGRES_DSN=store.constants.POSTGRES_DSN, POSTGRES_POOL_SIZE=3)
    with pytest.raises(RuntimeError, match=r'schema is at version 99, newer than this TYL knows '
                                           r'\(1\): upgrade TYL'):
        other.new().get_tfstate()


def test_migrate_into_postgres_keeps_the_history_and_the_lock(tyl_factory):
    """`tylserver.py migrate` replays each version with the metadata it was
    written with, a lock ID of the past among it: only the lock the server
    found (none) is checked, so the copy goes through."""
    from test_history_cli import configured, run
    from test_http import STATE, STATE2, lock, lock_info, unlock, write
    cluster = postgres_cluster.shared()
    source = tyl_factory('source').start()
    past, present = lock_info('L1', who='alice@ci'), lock_info('L2', who='bob@ci')
    assert lock(source, 'app', past)[0] == 200
    assert write(source, 'app', STATE, 'L1')[0] == 200
    assert unlock(source, 'app', past)[0] == 200
    assert lock(source, 'app', present)[0] == 200
    assert write(source, 'app', STATE2, 'L2')[0] == 200
    history = source.request('GET', '/history?env=app')[2]
    source.stop()
    destination = configured(tyl_factory, 'target', **cluster.config(cluster.new_database()))

    done = run(source, 'migrate', '--config', destination.config_path)
    assert done.returncode == 0, done.stderr
    assert b'migrated 1 environments (2 versions)' in done.stdout
    destination.start()
    copied = destination.request('GET', '/history?env=app')[2]
    assert [dict(v, version=None) for v in json.loads(copied)] == [
        dict(v, version=None) for v in json.loads(history)]
    assert [v['lock_id'] for v in json.loads(copied)] == ['L2', 'L1']
    assert destination.request('GET', '/?env=app')[2] == STATE2
    assert lock(destination, 'app', lock_info('L3'))[0] == 423


def test_without_psycopg_start_up_says_what_to_install(tmp_path):
    blocker = tmp_path / 'blocker' / 'psycopg'
    blocker.mkdir(parents=True)
    (blocker / '__init__.py').write_text('raise ImportError("simulated: not installed")\n')
    config = tmp_path / 'config.yaml'
    config.write_text('BACKEND_CLASS: postgres_backend.PostgresBackend\n')
    environ = {k: v for k, v in os.environ.items() if not k.startswith('TYL_')}
    blocked = subprocess.run([sys.executable, TYLSERVER, '--config', str(config), '--check-config'],
                             capture_output=True, text=True, timeout=30,
                             env=dict(environ, PYTHONPATH=str(blocker.parent)))
    assert blocked.returncode == 2 and blocked.stdout == ''
    assert blocked.stderr == ("tylserver: error: BACKEND_CLASS: cannot load module postgres_backend: "
                              "postgres_backend needs psycopg 3: "
                              "python3 -m pip install 'psycopg[binary]'\n")
