"""git_backend.GitBackend against a remote: a bare repository in tmp_path as
GIT_REPOSITORY, and one working repository per server process modelled.

test_backends.py runs the conformance suite on the backend's local mode;
here the remote mode gets the same checks for what it adds: one pushed
commit per change, the lock as a commit that a second server sees, a
refused push as a conflict and never a fork, and no value ever passed to
git as an option.
"""

import os
import subprocess
import sys
import threading

import pytest
import yaml

import test_backends as conformance
import tylserver
from test_backends import (L1, L2, SMALL_STATE, TRICKY_STATE, as_bytes, force_unlock, load, lock,
                           lock_body, store_state, unlock)

if tylserver.BUILTIN_BACKENDS_PATH not in sys.path:
    sys.path.insert(0, tylserver.BUILTIN_BACKENDS_PATH)
import git_backend  # noqa: E402  (found through the path above)

GIT_IDENTITY = {'GIT_AUTHOR_NAME': 't', 'GIT_AUTHOR_EMAIL': 't@t', 'GIT_COMMITTER_NAME': 't',
                'GIT_COMMITTER_EMAIL': 't@t'}


@pytest.fixture
def remote(tmp_path):
    path = tmp_path / 'remote.git'
    subprocess.run(['git', 'init', '--quiet', '--bare', str(path)], check=True)
    return str(path)


def server(tmp_path, name, remote, **config):
    """A function making backend instances as server `name` would: its own
    config and working repository, the shared remote."""
    workdir = tmp_path / name
    workdir.mkdir()
    config = dict({'BACKEND_CLASS': 'git_backend.GitBackend', 'GIT_REPOSITORY': remote,
                   'GIT_WORKING_PATH': 'work'}, **config)
    (workdir / 'config.yaml').write_text(yaml.safe_dump(config))
    constants, cls = load(str(workdir / 'config.yaml'))
    return lambda environment='env': cls(environment, constants)


def git(repository, *args, input=None):
    """Run git on `repository` as a user would; its output."""
    environ = dict(os.environ, GIT_DIR=repository, **GIT_IDENTITY)
    return subprocess.run(('git',) + args, input=input, env=environ, check=True,
                          stdout=subprocess.PIPE).stdout


def history(repository, branch='env'):
    """[(subject, author, parent count)] of `branch`, newest first."""
    log = git(repository, 'log', '--format=%s%x00%an <%ae>%x00%P', 'refs/heads/' + branch)
    return [(subject, author, len(parents.split()))
            for subject, author, parents in (line.split('\0') for line in log.decode().splitlines())]


def file_at(repository, name, branch='env'):
    return git(repository, 'cat-file', 'blob', 'refs/heads/%s:%s' % (branch, name))


def names_at(repository, branch='env'):
    return git(repository, 'ls-tree', '--name-only', 'refs/heads/' + branch).decode().splitlines()


def assert_linear(repository):
    """No commit anywhere in the remote has two parents, and every branch's
    history is the only one there is: nothing was ever forked or forced."""
    for line in git(repository, 'rev-list', '--parents', '--all').decode().splitlines():
        assert len(line.split()) <= 2, 'a merge in the remote: %s' % line


def test_every_change_is_one_pushed_commit_with_the_configured_message(tmp_path, remote):
    new = server(tmp_path, 'a', remote, GIT_USER_NAME='State Bot', GIT_USER_EMAIL='bot@example.com',
                 GIT_COMMIT_MESSAGE_FORMAT='{Operation} by {Who}{NoSuchField} [{ID}]',
                 GIT_STATE_CHANGE_LOG_FORMAT='{Who} {ID}', GIT_STATE_CHANGE_LOG_SCROLLBACK=3)
    instance = new()
    store_state(instance, SMALL_STATE)
    assert lock(instance, L1)
    store_state(instance, TRICKY_STATE)
    assert unlock(instance, L1)
    assert lock(instance, L2)
    assert force_unlock(instance)

    alice = 'OperationTypeApply by alice@host [11111111-1111-1111-1111-111111111111]'
    bob = 'OperationTypeApply by bob@host [22222222-2222-2222-2222-222222222222]'
    first = 'state written without a lock'
    subjects = [git_backend.FORCE_UNLOCK_TEXT, bob, alice, alice, alice, first]
    assert history(remote) == [(subject, 'State Bot <bot@example.com>', int(subject != first))
                               for subject in subjects]
    assert file_at(remote, 'terraform.tfstate') == TRICKY_STATE
    assert file_at(remote, 'terraform.tfstate.backup') == SMALL_STATE
    assert sorted(names_at(remote)) == ['state_change.log', 'terraform.tfstate',
                                        'terraform.tfstate.backup']
    assert file_at(remote, 'state_change.log').decode().splitlines() == [
        'alice@host 11111111-1111-1111-1111-111111111111 UNLOCK',
        'bob@host 22222222-2222-2222-2222-222222222222 LOCK',
        git_backend.FORCE_UNLOCK_TEXT]


def test_a_lock_taken_through_one_clone_is_refused_through_the_other(tmp_path, remote):
    one, two = server(tmp_path, 'a', remote)(), server(tmp_path, 'b', remote)()
    assert lock(one, L1)
    assert file_at(remote, 'LOCKED') == L1
    assert not lock(two, L2)
    assert two.get_lock_state().encode() == L1
    assert not unlock(two, L2)
    store_state(one, TRICKY_STATE)
    assert two.get_tfstate() == TRICKY_STATE
    assert unlock(one, L1)
    assert lock(two, L2)
    assert not lock(one, L1)
    assert one.get_lock_state().encode() == L2
    assert len(history(remote)) == 4
    assert_linear(remote)


def test_racing_servers_one_takes_the_lock_and_history_stays_linear(tmp_path, remote):
    servers = [server(tmp_path, 's%d' % n, remote) for n in range(6)]
    for round_number in range(3):
        instances = [new() for new in servers]
        barrier = threading.Barrier(len(instances), timeout=conformance.DEADLINE)
        bodies = [lock_body('race-%d-%d' % (round_number, n)) for n in range(len(instances))]
        results = [None] * len(instances)

        def racer(n):
            barrier.wait()
            results[n] = bool(lock(instances[n], bodies[n]))

        conformance.run_threads([lambda n=n: racer(n) for n in range(len(instances))])
        assert results.count(True) == 1, results
        assert file_at(remote, 'LOCKED') == bodies[results.index(True)]
        assert force_unlock(instances[0])
    assert len(history(remote)) == 6
    assert_linear(remote)


def test_a_push_refused_because_the_branch_moved_is_a_conflict_not_a_fork(tmp_path, remote, monkeypatch):
    one, two = server(tmp_path, 'a', remote)(), server(tmp_path, 'b', remote)()
    store_state(one, SMALL_STATE)

    def meanwhile(change):
        """Make `change` through server two after server one has built its
        commit on the remote's branch, before its push."""
        publish = one._publish

        def late(*args):
            monkeypatch.setattr(one, '_publish', publish)
            change()
            return publish(*args)
        monkeypatch.setattr(one, '_publish', late)

    meanwhile(lambda: store_state(two, TRICKY_STATE))
    with pytest.raises(git_backend.GitConflict, match='another server'):
        store_state(one, SMALL_STATE + b' ')
    assert file_at(remote, 'terraform.tfstate') == TRICKY_STATE
    assert one.get_tfstate() == TRICKY_STATE  # server one follows the remote again

    meanwhile(lambda: lock(two, L2))
    assert not lock(one, L1)
    assert one.get_lock_state().encode() == L2

    meanwhile(lambda: store_state(two, SMALL_STATE))
    with pytest.raises(git_backend.GitConflict):
        force_unlock(one)
    assert file_at(remote, 'LOCKED') == L2

    assert force_unlock(one)  # and it works again at once
    assert [parents for _, _, parents in history(remote)] == [1, 1, 1, 1, 0]
    assert_linear(remote)


def test_without_a_remote_a_branch_moved_by_another_writer_is_a_conflict(tmp_path, monkeypatch):
    instance = server(tmp_path, 'a', None)()
    store_state(instance, SMALL_STATE)
    repository = str(tmp_path / 'a' / 'work')
    publish = instance._publish

    def late(*args):
        monkeypatch.setattr(instance, '_publish', publish)
        moved = git(repository, 'commit-tree', 'refs/heads/env^{tree}', '-p', 'refs/heads/env',
                    '-m', 'by hand').strip()
        git(repository, 'update-ref', 'refs/heads/env', moved)
        return publish(*args)
    monkeypatch.setattr(instance, '_publish', late)
    with pytest.raises(git_backend.GitConflict):
        store_state(instance, TRICKY_STATE)
    assert [subject for subject, _, _ in history(repository)] == [
        'by hand', 'state written without a lock']
    store_state(instance, TRICKY_STATE)
    assert file_at(repository, 'terraform.tfstate') == TRICKY_STATE


def test_a_new_environment_starts_from_the_default_branch_without_its_state(tmp_path, remote):
    blob = git(remote, 'hash-object', '-w', '--stdin', input=b'read me\n').strip()
    state = git(remote, 'hash-object', '-w', '--stdin', input=SMALL_STATE).strip()
    tree = git(remote, 'mktree', input=b'100644 blob %s\tREADME\n100644 blob %s\tLOCKED\n'
               b'100644 blob %s\tterraform.tfstate\n' % (blob, state, state)).strip()
    master = git(remote, 'commit-tree', tree, '-m', 'seed').strip()
    git(remote, 'update-ref', 'refs/heads/trunk', master)
    instance = server(tmp_path, 'a', remote, GIT_DEFAULT_CLONE_BRANCH='origin/trunk')()
    assert as_bytes(instance.get_tfstate()) == b''
    assert instance.get_lock_state() == ''
    store_state(instance, TRICKY_STATE)
    assert git(remote, 'rev-parse', 'refs/heads/env^').strip() == master
    assert sorted(names_at(remote)) == ['README', 'terraform.tfstate']
    assert file_at(remote, 'terraform.tfstate') == TRICKY_STATE


def test_no_value_ever_reaches_git_as_an_option(tmp_path, remote, monkeypatch):
    run = subprocess.run
    commands = []

    def recorded(args, **kwargs):
        commands.append([os.fsdecode(arg) for arg in args])
        return run(args, **kwargs)
    monkeypatch.setattr(git_backend.subprocess, 'run', recorded)
    evil = '--upload-pack=touch PWNED'
    new = server(tmp_path, 'a', remote, GIT_DEFAULT_CLONE_BRANCH=evil, GIT_USER_NAME='--author=PWNED',
                 GIT_USER_EMAIL='-PWNED', GIT_COMMIT_MESSAGE_FORMAT='--amend PWNED {ID}',
                 GIT_STATE_CHANGE_LOG_FILENAME='--exec=touch PWNED')
    for name in ('-rf', '--help', '-', '../env', 'a/b', ''):
        with pytest.raises(ValueError):
            new(name)
    assert not commands
    branches = {'a..b': 'a%2E%2Eb', 'x.lock': 'x%2Elock', 'y.': 'y%2E', 'HEAD': 'HEAD'}
    for name, branch in branches.items():
        instance = new(name)
        assert lock(instance, L1) and not lock(instance, L2)
        store_state(instance, SMALL_STATE)
        assert instance.get_tfstate() == SMALL_STATE
        assert history(remote, branch)[0] == ('--amend PWNED 11111111-1111-1111-1111-111111111111',
                                              '--author=PWNED <-PWNED>', 1)
        assert '--exec=touch PWNED' in names_at(remote, branch)

    broken = server(tmp_path, 'b', evil)()
    with pytest.raises(git_backend.GitError, match='ls-remote'):
        lock(broken, L1)
    for command in commands:
        for arg in command:
            assert 'PWNED' not in arg or not arg.startswith('-'), command
    for directory in (str(tmp_path), os.getcwd()):
        for _, _, files in os.walk(directory):
            assert 'PWNED' not in files


# The conformance checks that matter for the remote mode, against a remote.
@pytest.mark.parametrize('check', [
    conformance.test_state_round_trip_is_exact,
    conformance.test_smaller_state_replaces_larger_one_entirely,
    conformance.test_delete_state_where_supported,
    conformance.test_environments_are_isolated,
    conformance.test_unlock_with_another_id_keeps_the_lock,
    conformance.test_unlock_when_free_returns_false,
    conformance.test_two_instances_see_one_lock_and_one_state,
    conformance.test_lock_and_state_survive_a_restart,
    conformance.test_stored_files_are_private,
], ids=lambda check: check.__name__[len('test_'):])
def test_conformance_with_a_remote(check, tmp_path, remote):
    backend = conformance.Backend('git-remote', 'git_backend.GitBackend',
                                  {'GIT_WORKING_PATH': 'store', 'GIT_REPOSITORY': remote},
                                  persistent=True, checks_unlock_id=True)
    check(conformance.Store(backend, str(tmp_path / 'server')))


@pytest.mark.parametrize('key, value', [
    ('GIT_COMMIT_MESSAGE_FORMAT', '{Who'),
    ('GIT_COMMIT_MESSAGE_FORMAT', '{0}'),
    ('GIT_STATE_CHANGE_LOG_FORMAT', '{Who.real}'),
    ('GIT_STATE_CHANGE_LOG_FILENAME', 'logs/state.log'),
    ('GIT_STATE_CHANGE_LOG_FILENAME', '..'),
    ('GIT_STATE_CHANGE_LOG_SCROLLBACK', 0),
    ('GIT_REPOSITORY', 42),
    ('GIT_WORKING_PATH', ''),
])
def test_a_bad_git_setting_is_refused_at_start_up(tmp_path, key, value):
    (tmp_path / 'config.yaml').write_text(yaml.safe_dump({key: value}))
    with pytest.raises(tylserver.ConfigError, match=key):
        tylserver.load_config(str(tmp_path / 'config.yaml'), environ={})
