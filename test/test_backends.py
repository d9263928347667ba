"""One conformance suite for every store in backends/.

Like Terraform's shared remote-state tests (remote.TestClient and
remote.TestRemoteLocks), every test runs against each entry of BACKENDS.
An entry names the store's BACKEND_CLASS, the config it needs (or a
function returning it, called for each fresh storage) and the capabilities
it claims; adding a backend is adding one line.

Instances are built as the server builds them: `tylserver.load_config` on a
config file in the test's directory, then `tylserver.load_plugins`.  Every
further instance on the same config shares the same storage, so it models a
second server process, or the same server after a restart.  Backends are
called as `tylserver.Environment` calls them (see `call`).

A test needing a capability a backend does not claim is reported as skipped
with the reason, never left out silently.
"""

import collections
import errno
import fcntl
import gc
import hashlib
import json
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time

import pytest
import yaml

import postgres_cluster
import tylserver
import tylstore

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# persistent: state and lock live in storage that every instance on the same
#     config shares and that outlives the instance (restart, second process,
#     kill -9).
# checks_unlock_id: set_unlocked with an ID releases only the lock of that ID.
# keeps_history: every state stored is a version (list_versions, get_version).
# rechecks_holder: store_tfstate stores nothing (LockChanged) when the lock
#     is no longer the one the server saw (`holder_id`).
Backend = collections.namedtuple('Backend', 'name backend_class config persistent checks_unlock_id '
                                            'keeps_history rechecks_holder', defaults=(False, False))

BACKENDS = [
    Backend('file', 'file_backend.FileBackend', {'FILE_DATA_PATH': 'store'},
            persistent=True, checks_unlock_id=True, keeps_history=True, rechecks_holder=True),
    Backend('sqlite', 'sqlite_backend.SQLiteBackend', {'SQLITE_DB_PATH': 'store/tyl.sqlite3'},
            persistent=True, checks_unlock_id=True, keeps_history=True, rechecks_holder=True),
    Backend('pyshelve', 'pyshelve_backend.PyShelveBackend', {'PYSHELVE_DATA_PATH': 'store'},
            persistent=True, checks_unlock_id=True),
    Backend('aes', 'aes_backend.AESBackend', {'FILE_DATA_PATH': 'store', 'AES_SECRET_KEY': 'A' * 43 + '='},
            persistent=True, checks_unlock_id=True, keeps_history=True, rechecks_holder=True),
    Backend('git', 'git_backend.GitBackend', {'GIT_WORKING_PATH': 'store'}, persistent=True, checks_unlock_id=True,
            keeps_history=True),
    Backend('postgres', 'postgres_backend.PostgresBackend', postgres_cluster.store_config,
            persistent=True, checks_unlock_id=True, keeps_history=True, rechecks_holder=True),
    Backend('template', 'TEMPLATE_backend.TemplateBackend', {'YES_I_KNOW_WHAT_I_AM_DOING': True},
            persistent=False, checks_unlock_id=False),
]

MB = 1024 * 1024
KILL_STATE_BYTES = 20 * MB
KILL_ROUNDS = 4
LARGE_STATE_BYTES = 50 * MB
KEPT_VERSIONS = 5
RACERS = 8
RACE_ROUNDS = 25
# Seconds any one wait in this file may last before the test fails.
DEADLINE = 60


def each_backend(*needs):
    """Parametrize the `store` fixture over BACKENDS.  A backend without one
    of the capabilities in `needs` is skipped, the reason naming it."""
    params = []
    for backend in BACKENDS:
        missing = [need for need in needs if not getattr(backend, need)]
        marks = [pytest.mark.skip(reason='%s backend does not claim %s'
                                  % (backend.name, ', '.join(missing)))] if missing else []
        params.append(pytest.param(backend, id=backend.name, marks=marks))
    return pytest.mark.parametrize('store', params, indirect=True)


class Store(object):
    """One backend's storage under `workdir`, with the config file that
    names it (and `extra_config`); each `new()` is one more instance on it."""

    def __init__(self, backend, workdir, **extra_config):
        self.backend = backend
        self.workdir = workdir
        self.storage = os.path.join(workdir, 'store')
        self.config_path = os.path.join(workdir, 'config.yaml')
        os.makedirs(workdir, exist_ok=True)
        # The plugin path is the built-in one, already on sys.path, so that
        # the many stores of a run do not each add a directory to it.
        config = dict(backend.config() if callable(backend.config) else backend.config,
                      BACKEND_CLASS=backend.backend_class,
                      BACKEND_PLUGINS_PATH=os.path.join(ROOT, 'backends'))
        # Few versions by default, so that the kill test's 20 MB states do
        # not pile up; the history tests set their own.
        config.update(dict({'HISTORY_KEEP': KEPT_VERSIONS}, **extra_config))
        with open(self.config_path, 'w') as stream:
            yaml.safe_dump(config, stream)
        self.constants, self.cls = load(self.config_path)

    def new(self, environment='env'):
        """A new instance on the same storage: another server process."""
        return self.cls(environment, self.constants)


def load(config_path):
    """(constants, backend class) exactly as tylserver.main gets them."""
    constants = tylserver.load_config(config_path, environ={})
    return constants, tylserver.load_plugins(constants).backend_class


@pytest.fixture
def store(request, tmp_path):
    return Store(request.param, str(tmp_path))


# -- calling a backend the way the server does -------------------------------

def server_arguments(instance, body):
    """(object, kwargs) that tylserver.Environment passes for request `body`:
    the parsed object, `raw` text, and `raw_bytes` only for RAW_BYTES."""
    obj, text = tylserver.parse_json_object(body, 'body')
    kwargs = {'raw': text}
    if type(instance).RAW_BYTES:
        kwargs['raw_bytes'] = body
    return obj, kwargs


def call(instance, method_name, body):
    obj, kwargs = server_arguments(instance, body)
    return getattr(instance, method_name)(obj, **kwargs)


def lock(instance, body):
    return call(instance, 'set_locked', body)


def unlock(instance, body):
    return call(instance, 'set_unlocked', body)


def force_unlock(instance):
    """Terraform's force-unlock, as the server passes it: no ID."""
    return call(instance, 'set_unlocked', b'{}')


def state_arguments(instance, body, holder=''):
    """(object, kwargs) that tylserver.Environment passes to store_tfstate:
    those of `server_arguments` and, for RAW_BYTES, the version's
    `metadata`, written under the lock `holder`."""
    obj, kwargs = server_arguments(instance, body)
    if type(instance).RAW_BYTES:
        kwargs['metadata'] = tylserver._version_metadata(body, tylserver.inspect_state(body), holder)
    return obj, kwargs


def store_state(instance, body, holder='', holder_id=None):
    """store_tfstate as the server calls it; `holder_id`, the ID of the
    lock the server saw, goes to RAW_BYTES stores that check it again."""
    obj, kwargs = state_arguments(instance, body, holder)
    if holder_id is not None and type(instance).RAW_BYTES:
        kwargs['holder_id'] = holder_id
    return instance.store_tfstate(obj, **kwargs)


def as_bytes(value):
    """A stored state or lock as bytes, whichever of bytes, text or object
    the backend returned; b'' for an empty value."""
    if not value:
        return b''
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode('utf-8')
    return json.dumps(value).encode('utf-8')


def is_stored(instance, got, body):
    """Whether `got` is `body`: byte for byte for a RAW_BYTES backend, else
    as JSON."""
    got = as_bytes(got)
    if type(instance).RAW_BYTES:
        return got == body
    return bool(got) and json.loads(got.decode('utf-8')) == json.loads(body.decode('utf-8'))


def assert_stored(instance, got, body):
    """Large values are summarized on failure, never diffed."""
    assert is_stored(instance, got, body), 'stored %s, expected %s' % (
        summary(as_bytes(got)), summary(body))


def summary(data):
    if len(data) <= 300:
        return repr(data)
    return '%d bytes sha256 %s, starting %r' % (len(data), hashlib.sha256(data).hexdigest()[:16],
                                                data[:80])


def lock_body(lock_id, who='alice'):
    """LockInfo as Terraform sends it, with unusual order, spacing and text,
    so that only a byte-exact store gives it back unchanged."""
    return ('{"Operation":"OperationTypeApply",  "ID":"%s","Info":"caf\\u00e9 \u2028 \U0001F996",'
            '"Who":"%s@host","Version":"1.6.0","Created":"2024-02-29T23:59:59.999999999Z",'
            '"Path":""}\n' % (lock_id, who)).encode('utf-8')


L1 = lock_body('11111111-1111-1111-1111-111111111111')
L2 = lock_body('22222222-2222-2222-2222-222222222222', who='bob')

TRICKY_STATE = (
    '{"serial":  123456789012345678901234567890, "version" :4,\r\n'
    '\t"lineage":"0c4e\u2028\u2029-\U0001F996", "terraform_version":"1.6.0",\n'
    ' "outputs":{"z":{"value":1e400,"type":"number"},"a":{"value":-0.0,"type":"number"},'
    '"big":{"value":-999999999999999999999999999999,"type":"number"},'
    '"s":{"value":"\\ud83e\\udd96 \U0001F996 \\u2028 \u00e9 e\u0301 \\" \\\\ \\/","type":"string"},'
    '"dup":{"value":1,"value":2}},\n'
    ' "resources" : [ ] ,"check_results":null }   \n'
).encode('utf-8')

SMALL_STATE = b'{"version":4,"serial":2,"lineage":"x","outputs":{},"resources":[]}'


def big_state(label, size):
    """A valid state of at least `size` bytes in which every chunk names
    `label`: a mixture of two such states equals neither."""
    chunk = '%s:0123456789abcdef-\u00fc-\U0001F996-' % label
    count = size // len(chunk.encode('utf-8')) + 1
    return ('{"version":4,"serial":1,"lineage":"%s","terraform_version":"1.6.0",'
            '"outputs":{"blob":{"type":"string","value":"%s"}},"resources":[]}\n'
            % (label, chunk * count)).encode('utf-8')


def run_threads(targets):
    """Run each callable in its own thread; re-raise the first error."""
    errors = []

    def guarded(target):
        try:
            target()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(target,), daemon=True) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE)
        assert not thread.is_alive(), 'a thread is still running after %d s' % DEADLINE
    if errors:
        raise errors[0]


# -- state -------------------------------------------------------------------

@each_backend()
def test_no_state_and_no_lock_read_as_empty(store):
    instance = store.new()
    assert as_bytes(instance.get_tfstate()) == b''
    assert as_bytes(instance.get_lock_state()) == b''


@each_backend()
def test_state_round_trip_is_exact(store):
    instance = store.new()
    stored = store_state(instance, TRICKY_STATE)
    assert_stored(instance, instance.get_tfstate(), TRICKY_STATE)
    if not store.cls.supports('open_tfstate'):
        return  # what store_tfstate returns is then ignored
    with instance.open_tfstate() as stream:
        assert stream.read() == TRICKY_STATE
        # What store_tfstate may return: the stat of the very file stored.
        assert stored is None or tylserver._file_identity(stored) == \
            tylserver._file_identity(os.fstat(stream.fileno()))


@each_backend()
def test_smaller_state_replaces_larger_one_entirely(store):
    instance = store.new()
    store_state(instance, big_state('A', 64 * 1024))
    store_state(instance, SMALL_STATE)
    assert_stored(instance, instance.get_tfstate(), SMALL_STATE)


@each_backend()
def test_large_state_round_trip(store):
    body = big_state('L', LARGE_STATE_BYTES)
    instance = store.new()
    store_state(instance, body)
    assert_stored(instance, instance.get_tfstate(), body)


@each_backend()
def test_delete_state_where_supported(store):
    instance = store.new()
    if not type(instance).supports('delete_tfstate'):
        # The contract's answer for "not supported"; the server makes it a 405.
        with pytest.raises(NotImplementedError):
            instance.delete_tfstate()
        return
    instance.delete_tfstate()  # no state yet: nothing to do, no error
    store_state(instance, TRICKY_STATE)
    assert lock(instance, L1)
    instance.delete_tfstate()
    assert as_bytes(instance.get_tfstate()) == b''
    assert_stored(instance, instance.get_lock_state(), L1)
    store_state(instance, SMALL_STATE)
    assert_stored(instance, instance.get_tfstate(), SMALL_STATE)


@each_backend()
def test_environments_are_isolated(store):
    one, two = store.new('env-one'), store.new('env-two')
    store_state(one, TRICKY_STATE)
    assert lock(one, L1)
    assert as_bytes(two.get_tfstate()) == b''
    assert as_bytes(two.get_lock_state()) == b''
    assert lock(two, L2)
    assert force_unlock(two)
    assert_stored(one, one.get_lock_state(), L1)
    if type(two).supports('delete_tfstate'):
        two.delete_tfstate()
    assert_stored(one, one.get_tfstate(), TRICKY_STATE)


@each_backend()
def test_backend_status_is_json(store):
    instance = store.new()
    json.dumps(instance.backend_status())
    store_state(instance, SMALL_STATE)
    assert lock(instance, L1)
    json.dumps(instance.backend_status())


# -- the lock ------------------------------------------------------------------

@each_backend()
def test_lock_is_stored_exactly(store):
    instance = store.new()
    assert lock(instance, L1)
    assert_stored(instance, instance.get_lock_state(), L1)


@each_backend()
def test_same_id_again_while_held_is_refused(store):
    # The server answers a same-ID retry with 200 before calling set_locked;
    # the backend itself only sees "already held".
    instance = store.new()
    assert lock(instance, L1)
    assert not lock(instance, L1)
    assert_stored(instance, instance.get_lock_state(), L1)


@each_backend()
def test_conflicting_lock_is_refused_and_holder_kept(store):
    instance = store.new()
    assert lock(instance, L1)
    assert not lock(instance, L2)
    assert_stored(instance, instance.get_lock_state(), L1)


@each_backend()
def test_unlock_releases_and_lock_can_be_taken_again(store):
    instance = store.new()
    assert lock(instance, L1)
    assert unlock(instance, L1)
    assert as_bytes(instance.get_lock_state()) == b''
    assert lock(instance, L2)
    assert_stored(instance, instance.get_lock_state(), L2)


@each_backend()
def test_unlock_when_free_returns_false(store):
    instance = store.new()
    assert not unlock(instance, L1)
    assert not force_unlock(instance)
    assert lock(instance, L1)
    assert unlock(instance, L1)
    assert not unlock(instance, L1)


@each_backend('rechecks_holder')
def test_a_write_whose_lock_another_server_changed_meanwhile_stores_nothing(store):
    # Server A saw lock L1 held; before its write reached the store, server
    # B, on the same storage, force-unlocked, locked L2 and wrote.
    a, b = store.new(), store.new()
    id1, id2 = tylstore.lock_id(L1), tylstore.lock_id(L2)
    assert lock(a, L1)
    store_state(a, big_state('A', 100), holder=L1, holder_id=id1)
    assert force_unlock(b) and lock(b, L2)
    store_state(b, big_state('B', 100), holder=L2, holder_id=id2)
    with pytest.raises(tylstore.LockChanged):
        store_state(a, big_state('late', 100), holder=L1, holder_id=id1)
    with pytest.raises(tylstore.LockChanged):     # written without a lock, none being seen
        store_state(a, big_state('unlocked', 100), holder_id='')
    for stale in (id1, ''):                         # and a DELETE likewise
        with pytest.raises(tylstore.LockChanged):
            a.delete_tfstate(holder_id=stale)
    assert_stored(a, a.get_tfstate(), big_state('B', 100))
    if store.backend.keeps_history:
        assert len(a.list_versions()) == 2
        assert_stored(a, a.get_version(a.list_versions()[0]['version']), big_state('B', 100))
    assert unlock(b, L2)
    store_state(a, big_state('C', 100), holder_id='')
    assert_stored(b, b.get_tfstate(), big_state('C', 100))


@each_backend('checks_unlock_id')
def test_unlock_with_another_id_keeps_the_lock(store):
    instance = store.new()
    assert lock(instance, L1)
    assert not unlock(instance, L2)
    assert_stored(instance, instance.get_lock_state(), L1)
    assert unlock(instance, L1)


@each_backend()
def test_force_unlock_always_releases(store):
    instance = store.new()
    assert lock(instance, L1)
    assert force_unlock(instance)
    assert as_bytes(instance.get_lock_state()) == b''


@each_backend()
def test_instance_works_from_any_thread(store):
    # The server creates an instance in one handler thread and calls it
    # from whichever thread serves the next request (one at a time).
    instance = store.new()
    steps = [lambda: store_state(instance, SMALL_STATE),
             lambda: assert_stored(instance, instance.get_tfstate(), SMALL_STATE),
             lambda: lock(instance, L1),
             lambda: assert_stored(instance, instance.get_lock_state(), L1),
             lambda: unlock(instance, L1)]
    for step in steps:
        run_threads([step])
    assert as_bytes(instance.get_lock_state()) == b''


# -- several instances on the same storage ------------------------------------

@each_backend('persistent')
def test_two_instances_see_one_lock_and_one_state(store):
    one, two = store.new(), store.new()
    assert lock(one, L1)
    assert not lock(two, L2)
    assert_stored(two, two.get_lock_state(), L1)
    if store.backend.checks_unlock_id:
        assert not unlock(two, L2)
    store_state(one, TRICKY_STATE)
    assert_stored(two, two.get_tfstate(), TRICKY_STATE)
    assert unlock(one, L1)
    assert lock(two, L2)
    assert not lock(one, L1)
    assert_stored(one, one.get_lock_state(), L2)
    assert force_unlock(one)
    assert as_bytes(two.get_lock_state()) == b''


@each_backend('persistent')
def test_racing_instances_exactly_one_takes_the_lock(store):
    for round_number in range(RACE_ROUNDS):
        # Fresh storage each round: the racers first race to set it up.
        fresh = Store(store.backend, os.path.join(store.workdir, 'round-%d' % round_number))
        barrier = threading.Barrier(RACERS, timeout=DEADLINE)
        bodies = [lock_body('race-%d-%d' % (round_number, n), who='racer%d' % n)
                  for n in range(RACERS)]
        results = [None] * RACERS

        def racer(n):
            barrier.wait()
            try:
                instance = fresh.new()
            except BaseException:
                barrier.abort()  # the others fail now, not after DEADLINE
                raise
            barrier.wait()
            results[n] = bool(lock(instance, bodies[n]))

        run_threads([lambda n=n: racer(n) for n in range(RACERS)])
        assert results.count(True) == 1, 'round %d: %r' % (round_number, results)
        checker = fresh.new()
        assert_stored(checker, checker.get_lock_state(), bodies[results.index(True)])
        assert force_unlock(checker)


@each_backend('persistent')
def test_lock_and_state_survive_a_restart(store):
    before = store.new()
    store_state(before, TRICKY_STATE)
    assert lock(before, L1)
    del before
    gc.collect()
    after = store.new()
    assert_stored(after, after.get_tfstate(), TRICKY_STATE)
    assert_stored(after, after.get_lock_state(), L1)
    assert unlock(after, L1)


@each_backend('persistent')
def test_stored_files_are_private(store):
    instance = store.new()
    store_state(instance, SMALL_STATE)
    assert lock(instance, L1)
    for directory, _, files in os.walk(store.storage):
        for path in [directory] + [os.path.join(directory, name) for name in files]:
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            assert mode & 0o077 == 0, '%s is %o: state holds secrets' % (path, mode)


# -- kill -9 in the middle of a write ------------------------------------------

# The writer: loop storing states B, A, B, ... through its own instance, and
# mark each call's start (S) and end (D) on stdout, unbuffered.
WRITER = r'''
import os, sys, time
root, here, config_path, ready_path, size = sys.argv[1:6]
sys.path[:0] = [root, here]
from test_backends import big_state, load, state_arguments
constants, cls = load(config_path)
instance = cls('env', constants)
writes = [state_arguments(instance, big_state(label, int(size))) for label in 'BA']
open(ready_path, 'w').close()
deadline = time.monotonic() + %d
for number in range(10000):
    if time.monotonic() > deadline:
        break
    obj, kwargs = writes[number %% 2]
    os.write(1, b'S\n')
    instance.store_tfstate(obj, **kwargs)
    os.write(1, b'D\n')
''' % DEADLINE


def wait_for_file(path, process):
    deadline = time.monotonic() + DEADLINE
    while not os.path.exists(path):
        assert process.poll() is None, 'the writer exited with %s' % process.returncode
        assert time.monotonic() < deadline, 'the writer did not start in %d s' % DEADLINE
        time.sleep(0.005)


@each_backend('persistent')
def test_kill_during_write_leaves_old_or_new_state(store):
    state_a, state_b = big_state('A', KILL_STATE_BYTES), big_state('B', KILL_STATE_BYTES)
    instance = store.new()
    started = time.monotonic()
    store_state(instance, state_a)
    write_seconds = time.monotonic() - started
    mid_write_kills = 0
    for round_number in range(KILL_ROUNDS):
        ready = os.path.join(store.workdir, 'ready-%d' % round_number)
        marks = os.path.join(store.workdir, 'marks-%d' % round_number)
        with open(marks, 'wb') as marks_stream:
            writer = subprocess.Popen(
                [sys.executable, '-c', WRITER, ROOT, HERE, store.config_path, ready,
                 str(KILL_STATE_BYTES)], stdout=marks_stream, stdin=subprocess.DEVNULL)
        try:
            wait_for_file(ready, writer)
            time.sleep(random.uniform(0, min(3 * write_seconds + 0.05, 2.0)))
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait(DEADLINE)
        with open(marks, 'rb') as marks_stream:
            mid_write_kills += marks_stream.read().endswith(b'S\n')
        reader = store.new()
        state = reader.get_tfstate()
        assert is_stored(reader, state, state_a) or is_stored(reader, state, state_b), \
            'round %d: torn state: %s' % (round_number, summary(as_bytes(state)))
    assert mid_write_kills, 'no kill landed inside store_tfstate; the test proved nothing'
    if store.backend.keeps_history:
        assert_history_is_whole(store.new())
    after = store.new()
    store_state(after, SMALL_STATE)
    assert_stored(after, after.get_tfstate(), SMALL_STATE)
    assert lock(after, L1)


# -- history -------------------------------------------------------------------

def distinct_states(count):
    """`count` small states, serials 1 to `count`, spaced unusually."""
    return [('{"version":4 ,"serial": %d,"lineage":"l\u00e9","outputs":{"n":{"value":"%d \U0001F996",'
             '"type":"string"}},"resources":[]}\n' % (n, n)).encode('utf-8') for n in range(1, count + 1)]


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def assert_history_is_whole(instance):
    """Every version listed gives bytes that match its metadata, and the
    state in place is one of them."""
    versions = instance.list_versions()
    assert versions, 'no version listed'
    for version in versions:
        data = instance.get_version(version['version'])
        assert data is not None, version
        assert (sha256(data), len(data)) == (version['sha256'], version['size']), version
    assert sha256(as_bytes(instance.get_tfstate())) in [version['sha256'] for version in versions]


def stored_versions(instance):
    return [instance.get_version(version['version']) for version in instance.list_versions()]


@each_backend()
def test_history_is_supported_exactly_where_claimed(store):
    for method_name in ('list_versions', 'get_version'):
        assert store.cls.supports(method_name) == store.backend.keeps_history, method_name


@each_backend('keeps_history')
def test_every_write_is_a_version_with_its_exact_bytes(store):
    instance = store.new()
    assert instance.list_versions() == []
    bodies = [TRICKY_STATE, SMALL_STATE, TRICKY_STATE]
    for body in bodies:
        store_state(instance, body)
    versions = instance.list_versions()
    assert len({version['version'] for version in versions}) == 3
    assert all(isinstance(version['version'], str) for version in versions)
    assert stored_versions(instance) == bodies[::-1]
    assert_history_is_whole(instance)
    assert store.new().list_versions() == versions  # another process sees the same


@each_backend('keeps_history')
def test_a_version_carries_its_metadata(store):
    instance = store.new()
    assert lock(instance, L1)
    before = time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())
    store_state(instance, TRICKY_STATE, holder=L1.decode('utf-8'))
    after = time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())
    [version] = instance.list_versions()
    assert before <= version['created'] <= after
    assert version == {
        'version': version['version'], 'created': version['created'],
        'serial': 123456789012345678901234567890, 'lineage': '0c4e\u2028\u2029-\U0001F996',
        'size': len(TRICKY_STATE), 'sha256': sha256(TRICKY_STATE),
        'lock_id': '11111111-1111-1111-1111-111111111111', 'who': 'alice@host',
    }


@each_backend('keeps_history')
def test_history_keeps_the_newest_history_keep_versions(store):
    kept = Store(store.backend, os.path.join(store.workdir, 'keep3'), HISTORY_KEEP=3)
    instance = kept.new()
    identifiers = []
    bodies = distinct_states(7)
    for body in bodies:
        store_state(instance, body)
        identifiers.append(instance.list_versions()[0]['version'])
    assert [version['version'] for version in instance.list_versions()] == identifiers[:-4:-1]
    assert stored_versions(instance) == bodies[:-4:-1]
    assert [instance.get_version(identifier) for identifier in identifiers[:4]] == [None] * 4
    assert_history_is_whole(instance)


@each_backend('keeps_history')
def test_two_instances_writing_in_turn_keep_one_ordered_history(store):
    """Each instance's next version is above the other's newest, even when
    the other wrote and pruned past everything the first one knew."""
    kept = Store(store.backend, os.path.join(store.workdir, 'turns'), HISTORY_KEEP=3)
    first, second = kept.new(), kept.new()
    bodies = distinct_states(12)
    for writer, count in ((first, 2), (second, 5), (first, 1), (second, 1), (first, 3)):
        for _ in range(count):
            store_state(writer, bodies.pop(0))
    expected = distinct_states(12)[:-4:-1]
    for instance in (first, second):
        assert stored_versions(instance) == expected
        assert_stored(instance, instance.get_tfstate(), expected[0])


@each_backend('keeps_history')
def test_history_drops_versions_older_than_history_keep_days_but_the_newest(store):
    aged = Store(store.backend, os.path.join(store.workdir, 'days'), HISTORY_KEEP_DAYS=2)
    instance = aged.new()
    three_days_ago = time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(time.time() - 3 * 86400))
    old, new = distinct_states(5)[:3], distinct_states(5)[3:]
    for body in old:
        obj, kwargs = state_arguments(instance, body)
        kwargs['metadata']['created'] = three_days_ago
        instance.store_tfstate(obj, **kwargs)
    assert stored_versions(instance) == [old[-1]]
    for body in new:
        store_state(instance, body)
    assert stored_versions(instance) == new[::-1]


@each_backend('keeps_history')
def test_history_keep_0_keeps_no_versions(store):
    instance = Store(store.backend, os.path.join(store.workdir, 'none'), HISTORY_KEEP=0).new()
    store_state(instance, TRICKY_STATE)
    store_state(instance, SMALL_STATE)
    assert instance.list_versions() == []
    assert_stored(instance, instance.get_tfstate(), SMALL_STATE)


@each_backend('keeps_history')
def test_an_unknown_or_malformed_version_is_none(store):
    instance = store.new()
    store_state(instance, SMALL_STATE)
    [version] = instance.list_versions()
    for unknown in ['', '0', '2', '01', '-1', '+1', ' 1', '1 ', '1.json', '../env/terraform.tfstate',
                    version['version'] + '/', version['version'] + '\0', '9' * 100, 'a' * 40,
                    '0' * 64, '%s', 'HEAD', 'HEAD~1']:
        if unknown != version['version']:
            assert instance.get_version(unknown) is None, unknown
    assert instance.get_version(version['version']) == SMALL_STATE


@each_backend('keeps_history')
def test_history_outlives_a_deleted_state(store):
    instance = store.new()
    store_state(instance, TRICKY_STATE)
    instance.delete_tfstate()
    assert as_bytes(instance.get_tfstate()) == b''
    assert stored_versions(instance) == [TRICKY_STATE]
    store_state(instance, SMALL_STATE)
    assert stored_versions(instance) == [SMALL_STATE, TRICKY_STATE]


@each_backend()
def test_environments_are_listed_where_supported(store):
    if not store.cls.supports('list_environments'):
        with pytest.raises(NotImplementedError):
            store.cls.list_environments(store.constants)
        return
    assert store.cls.list_environments(store.constants) == []
    store_state(store.new('b-env'), SMALL_STATE)
    assert lock(store.new('a.env'), L1)
    store_state(store.new('c..d.lock'), SMALL_STATE)
    store.new('never-written').get_tfstate()
    assert store.cls.list_environments(store.constants) == ['a.env', 'b-env', 'c..d.lock']


# -- what a crash can leave of the file stores' writes ----------------------------

@pytest.mark.parametrize('store', [pytest.param(backend, id=backend.name) for backend in BACKENDS
                                   if backend.name in ('file', 'aes')], indirect=True)
def test_an_empty_lock_file_left_by_a_crash_is_no_lock(store):
    """A crash between creating lock.json and its fsync can leave it empty.
    That LOCK was never answered, so the file holds no lock; once old, it
    gives way to the next LOCK, but not while it may be a lock being
    written."""
    instance = store.new()
    store_state(instance, SMALL_STATE)
    path = os.path.join(store.storage, 'env', 'lock.json')
    open(path, 'wb').close()
    assert instance.get_lock_state() == ''
    assert not lock(instance, L1)
    a_minute_ago = time.time() - 60
    os.utime(path, (a_minute_ago, a_minute_ago))
    assert lock(instance, L1)
    assert_stored(instance, instance.get_lock_state(), L1)
    assert not lock(store.new(), L2)


@pytest.mark.parametrize('store', [pytest.param(backend, id=backend.name) for backend in BACKENDS
                                   if backend.name in ('file', 'aes')], indirect=True)
def test_old_temporary_files_left_by_a_crash_are_removed_by_the_next_write(store):
    """A kill -9 during a write leaves its temporary file.  The next
    process's first write removes it once it is old, and leaves a young one
    alone: another process may be writing it."""
    store_state(store.new(), SMALL_STATE)
    directory = os.path.join(store.storage, 'env')
    old, young = os.path.join(directory, '.tmp-old'), os.path.join(directory, '.tmp-young')
    for path in (old, young):
        with open(path, 'wb') as stream:
            stream.write(b'{"version": 4, "serial": 9')
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    restarted = store.new()
    assert_stored(restarted, restarted.get_tfstate(), SMALL_STATE)
    assert os.path.exists(old), 'removed by a read'
    store_state(restarted, SMALL_STATE)
    assert not os.path.exists(old)
    assert os.path.exists(young)
    assert_stored(restarted, restarted.get_tfstate(), SMALL_STATE)


@pytest.mark.parametrize('store', [pytest.param(backend, id=backend.name) for backend in BACKENDS
                                   if backend.name in ('file', 'aes')], indirect=True)
def test_an_old_empty_lock_replaced_by_a_fresh_one_meanwhile_is_not_removed(store):
    """Two LOCKs find the same old empty lock.json; the first removes it
    and creates its own, empty until written, just before the second moves
    lock.json aside to remove it: the second must leave that one alone."""
    instance = store.new()
    store_state(instance, SMALL_STATE)
    path = os.path.join(store.storage, 'env', 'lock.json')
    open(path, 'wb').close()
    a_minute_ago = time.time() - 60
    os.utime(path, (a_minute_ago, a_minute_ago))
    remove_if = instance._remove_if

    def other_lock_meanwhile(*args):
        os.unlink(path)
        open(path, 'wb').close()   # the other LOCK's exclusive create, not yet written
        return remove_if(*args)

    instance._remove_if = other_lock_meanwhile
    assert not lock(instance, L1)
    assert os.path.exists(path)


# -- what a failed change leaves of the file stores' writes ----------------------

FILE_STORES = [pytest.param(backend, id=backend.name) for backend in BACKENDS
               if backend.name in ('file', 'aes')]
NO_SPACE = OSError(errno.ENOSPC, 'No space left on device')


def fail_on_call(monkeypatch, name, number):
    """Make file_backend's `name` (a function it imported) raise NO_SPACE
    on its `number`th call from now, as a full disk would."""
    module = sys.modules['file_backend']
    real, calls = getattr(module, name), []

    def failing(*args):
        calls.append(args)
        return (no_space if len(calls) == number else real)(*args)

    monkeypatch.setattr(module, name, failing)


def no_space(*args):
    raise NO_SPACE


def env_files(store):
    directory = os.path.join(store.storage, 'env')
    return sorted(os.path.relpath(os.path.join(root, name), directory)
                  for root, _, names in os.walk(directory) for name in names)


@pytest.mark.parametrize('failing', ['write_all', 'os.fsync'])
@pytest.mark.parametrize('store', FILE_STORES, indirect=True)
def test_a_lock_that_fails_to_be_written_leaves_no_lock(store, monkeypatch, failing):
    instance = store.new()
    store_state(instance, SMALL_STATE)
    before = env_files(store)
    if failing == 'os.fsync':
        monkeypatch.setattr(os, 'fsync', no_space)
    else:
        fail_on_call(monkeypatch, failing, 1)
    with pytest.raises(OSError):
        lock(instance, L1)
    monkeypatch.undo()
    assert env_files(store) == before
    assert lock(store.new(), L1), 'the failed LOCK left a lock behind'


@pytest.mark.parametrize('store', FILE_STORES, indirect=True)
def test_a_version_that_fails_to_be_written_leaves_nothing_and_takes_no_number(store, monkeypatch):
    instance = store.new()
    store_state(instance, SMALL_STATE)
    before = env_files(store)
    fail_on_call(monkeypatch, 'write_all', 1)    # the version's metadata
    with pytest.raises(OSError):
        store_state(instance, big_state('B', 1000))
    monkeypatch.undo()
    assert env_files(store) == before
    assert_stored(instance, instance.get_tfstate(), SMALL_STATE)
    store_state(instance, big_state('C', 1000))
    assert [v['version'] for v in instance.list_versions()] == ['2', '1']


@pytest.mark.parametrize('store', FILE_STORES, indirect=True)
def test_a_state_that_cannot_take_its_place_leaves_no_file_and_no_version(store):
    instance = store.new()
    store_state(instance, SMALL_STATE)
    directory = os.path.join(store.storage, 'env')
    state_path = os.path.join(directory, store.constants.TFSTATE_FILE_NAME)
    os.unlink(state_path)
    os.makedirs(os.path.join(state_path, 'in-the-way'))
    with pytest.raises(OSError):
        store_state(instance, big_state('B', 1000))
    assert [name for name in env_files(store) if not name.startswith(store.constants.TFSTATE_FILE_NAME)] \
        == ['.flock', 'history/1.json', 'history/1.tfstate']
    history = os.path.join(directory, 'history')
    os.rename(history, history + '.aside')
    with open(history, 'wb'):   # history/ cannot be listed now
        pass
    with pytest.raises(OSError):
        store_state(store.new(), big_state('C', 1000))
    assert not [name for name in os.listdir(directory) if name.startswith('.tmp-')]


def test_a_sqlite_database_locked_past_the_busy_timeout_is_a_503(tmp_path, monkeypatch):
    store = Store([backend for backend in BACKENDS if backend.name == 'sqlite'][0], str(tmp_path))
    monkeypatch.setattr(sys.modules['sqlite_backend'], 'BUSY_TIMEOUT', 0.3)
    instance = store.new()
    other = sqlite3.connect(store.constants.SQLITE_DB_PATH, isolation_level=None)
    try:
        other.execute('BEGIN IMMEDIATE')       # another process's write under way
        for change in (lambda: lock(instance, L1), lambda: store_state(instance, SMALL_STATE)):
            with pytest.raises(tylstore.BackendUnavailable, match='stayed locked'):
                change()
        other.execute('ROLLBACK')
    finally:
        other.close()
    assert lock(instance, L1)
    store_state(instance, SMALL_STATE)
    assert_stored(instance, instance.get_tfstate(), SMALL_STATE)


fcntl_flock = fcntl.flock


@pytest.mark.parametrize('store', FILE_STORES, indirect=True)
def test_a_change_waits_for_another_process_flock_a_bounded_time(store, monkeypatch):
    # A process stopped while it holds the flock, as SIGSTOP or a stalled
    # disk would leave it: a 503 to retry, not a request that hangs.
    instance = store.new()
    store_state(instance, SMALL_STATE)
    monkeypatch.setattr(sys.modules['file_backend'], 'FLOCK_WAIT', 0.3)
    held = os.open(os.path.join(store.storage, 'env', '.flock'), os.O_RDWR)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        started = time.monotonic()
        with pytest.raises(tylstore.BackendUnavailable, match='another process has held'):
            lock(instance, L1)
        assert time.monotonic() - started >= 0.3
        # Those queued behind it, while the stall lasts, fail at once: tried once.
        tries = []
        monkeypatch.setattr(sys.modules['file_backend'].fcntl, 'flock',
                            lambda *args: tries.append(args) or fcntl_flock(*args))
        for change in (lambda: lock(instance, L1), lambda: store_state(instance, TRICKY_STATE),
                       lambda: unlock(instance, L1)):
            with pytest.raises(tylstore.BackendUnavailable, match='another process has held'):
                change()
        assert len(tries) == 3
    finally:
        os.close(held)      # the kernel releases the flock with its last descriptor
    time.sleep(0.35)        # past the stall
    assert lock(instance, L1)
    assert_stored(instance, instance.get_tfstate(), SMALL_STATE)


@pytest.mark.skipif(not hasattr(os, 'geteuid') or os.geteuid() != 0, reason='needs root, to chown')
@pytest.mark.parametrize('store', FILE_STORES, indirect=True)
def test_a_flock_file_made_by_root_belongs_to_the_directory_owner(store):
    instance = store.new()
    store_state(instance, SMALL_STATE)
    directory = os.path.join(store.storage, 'env')
    os.unlink(os.path.join(directory, '.flock'))        # as an older TYL left it
    os.chown(directory, 65534, 65534)
    assert not unlock(store.new(), L1)                  # an admin command, as root
    found = os.stat(os.path.join(directory, '.flock'))
    assert (found.st_uid, found.st_gid, stat.S_IMODE(found.st_mode)) == (65534, 65534, 0o600)


@pytest.mark.parametrize('store', FILE_STORES, indirect=True)
def test_an_environment_only_locked_and_unlocked_is_not_listed(store):
    assert lock(store.new('typo'), L1) and unlock(store.new('typo'), L1)
    assert lock(store.new('held'), L2)
    store_state(store.new('deleted'), SMALL_STATE)
    store.new('deleted').delete_tfstate()       # its history stays, to restore from
    assert store.cls.list_environments(store.constants) == ['deleted', 'held']


@pytest.mark.parametrize('store', FILE_STORES, indirect=True)
def test_a_lock_file_that_is_not_a_file_is_named_not_taken_for_a_lock(store):
    instance = store.new()
    store_state(instance, SMALL_STATE)
    path = os.path.join(store.storage, 'env', 'lock.json')
    os.symlink(os.path.join(store.workdir, 'nowhere'), path)
    with pytest.raises(OSError, match='not a regular file'):
        lock(instance, L1)
    assert os.path.islink(path)
